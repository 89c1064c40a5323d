"""What a fuse request means: adapters with weights, their coefficients, checks, delta, bias.

Shared by the float and the quantized fuse paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import torch

from safemerge.errors import AdapterConfigError
from safemerge.merge import engine, guard
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.view import LayerView

#: One adapter, or several, each optionally with its own weight: ``[(a1, 0.7), (a2, 0.3)]``.
Adapters: TypeAlias = LoraAdapter | Sequence[LoraAdapter | tuple[LoraAdapter, float]]


def weighted(adapters: Adapters) -> list[tuple[LoraAdapter, float]]:
    if isinstance(adapters, LoraAdapter):
        return [(adapters, 1.0)]
    pairs: list[tuple[LoraAdapter, float]] = []
    for position, item in enumerate(adapters):
        if isinstance(item, LoraAdapter):
            pairs.append((item, 1.0))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], LoraAdapter):
            pairs.append((item[0], float(item[1])))
        else:
            raise AdapterConfigError(
                f"adapters[{position}] must be a LoraAdapter or a (LoraAdapter, weight) pair; "
                f"got {type(item).__name__}"
            )
    if not pairs:
        raise AdapterConfigError("no adapters given: pass a LoraAdapter or a non-empty list")
    return pairs


def coefficients(pairs: Sequence[tuple[LoraAdapter, float]], scale: float) -> tuple[float, ...]:
    """Per adapter, what multiplies ``B @ A``: its weight, its own scale, the overall scale."""
    return tuple(weight * adapter.scale * scale for adapter, weight in pairs)


def check_request(view: LayerView, pairs: list[tuple[LoraAdapter, float]], scale: float) -> None:
    if not math.isfinite(scale):
        raise AdapterConfigError(f"scale must be finite; got scale={scale}")
    for position, (adapter, weight) in enumerate(pairs):
        if not math.isfinite(weight):
            raise AdapterConfigError(
                f"the weight of adapter {position} must be finite; got {weight}"
            )
        view.check_fits(adapter)
    if len(pairs) > 1 and any(adapter.is_dora for adapter, _ in pairs):
        raise AdapterConfigError(
            f"layer {view.name!r}: a DoRA adapter renormalises the whole weight, so it cannot be "
            f"fused together with other adapters; fuse DoRA adapters one at a time"
        )


def low_rank_delta(
    view: LayerView, pairs: Sequence[tuple[LoraAdapter, float]], coefficients: Sequence[float]
) -> engine.LowRankDelta:
    terms = []
    for (adapter, _), coefficient in zip(pairs, coefficients, strict=True):
        left, right = view.factors(adapter)
        terms.append((left, right, coefficient))
    return engine.LowRankDelta.from_terms(terms, view.weight.device)


def merged_bias(
    view: LayerView,
    pairs: Sequence[tuple[LoraAdapter, float]],
    coefficients: Sequence[float],
    *,
    sign: float,
) -> torch.Tensor | None:
    """The layer's bias plus (or minus) each adapter's scaled lora_bias, guarded; None if unchanged."""
    if view.bias is None or all(adapter.lora_bias is None for adapter, _ in pairs):
        return None
    merged = view.bias.detach().to(torch.float32).clone()
    for (adapter, _), coefficient in zip(pairs, coefficients, strict=True):
        if adapter.lora_bias is not None:
            lora_bias = adapter.lora_bias.detach().to(device=merged.device, dtype=torch.float32)
            merged.add_(lora_bias.reshape(-1) * coefficient, alpha=sign)
    guard.check_vector(merged, layer=view.name, tensor="bias", dtype=view.bias.dtype)
    return merged.to(view.bias.dtype)
