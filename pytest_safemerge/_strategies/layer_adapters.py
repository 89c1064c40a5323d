"""The adapters of a layer case, as editable parts (so that a case can plant values in
them before they become ``safemerge.LoraAdapter`` objects), and an adapter's scale."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from pytest_safemerge._strategies.layer_kinds import ADAPTER_DTYPES
from pytest_safemerge._strategies.layer_shapes import Built
from pytest_safemerge._strategies.values import seeded_normal


@st.composite
def adapter_parts(
    draw: st.DrawFn,
    built: Built,
    options: frozenset[str],
    kind: str,
    generator: torch.Generator,
    dtype: torch.dtype | None,
    *,
    first: bool,
) -> dict[str, Any]:
    """The parts of one adapter (tensors still editable, for planting), all of one dtype:
    ``dtype``, or drawn. Values are drawn in float32 and rounded into it once; the tensors
    hold the values that the expected results are computed from."""
    rank = draw(st.integers(1, 8))
    overflow = kind in ("cast-overflow", "bias-overflow")
    # An overflow case computes the planted values from the adapter's scale: alpha=None
    # keeps that scale at 1 (sqrt(rank) with rsLoRA), so the values stay float32-finite.
    alpha = None if overflow else draw(st.sampled_from((None, 16.0, 1.0, 8.0, 2.0 * rank, 0.5)))
    use_rslora = draw(st.booleans())
    if dtype is None:
        # float32 (PEFT's default), or half: a merge upcasts before the matmul.
        dtype = draw(st.sampled_from(ADAPTER_DTYPES))
    spread = draw(st.sampled_from((1.0, 0.1, 3.0))) / built.in_features**0.5
    lora_A = seeded_normal((rank, built.in_features, *built.kernel), spread, dtype, generator)
    lora_B = seeded_normal(
        (built.out_features, rank, *(1 for _ in built.kernel)),
        draw(st.sampled_from((0.02, 1.0, 0.0))),
        dtype,
        generator,
    )
    lora_bias = None
    if "lora-bias" in options and (first or draw(st.booleans())):
        std = draw(st.sampled_from((0.02, 1.0)))
        lora_bias = seeded_normal((built.out_features,), std, dtype, generator)
    magnitude = None
    if "dora" in options:
        magnitude = torch.rand(built.out_features, generator=generator) * 2 + 0.25
    return {
        "lora_A": lora_A,
        "lora_B": lora_B,
        "alpha": alpha,
        "use_rslora": use_rslora,
        "lora_bias": lora_bias,
        "magnitude": None if magnitude is None else magnitude.to(dtype),
    }


def adapter_scale(parts: dict[str, Any]) -> float:
    """The adapter's own scale: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""
    rank = int(parts["lora_A"].shape[0])
    alpha = float(rank) if parts["alpha"] is None else float(parts["alpha"])
    return alpha / math.sqrt(rank) if parts["use_rslora"] else alpha / rank
