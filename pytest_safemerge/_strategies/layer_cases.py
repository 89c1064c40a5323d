"""The :func:`layer_cases` strategy: its argument checks (run when it is built) and the
composite that draws a case (options, layer, adapters, scale, then what is planted)."""

from __future__ import annotations

from collections.abc import Collection

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

from pytest_safemerge._strategies import validation
from pytest_safemerge._strategies.layer_adapters import adapter_parts
from pytest_safemerge._strategies.layer_adversarial import overflow, planted_non_finite
from pytest_safemerge._strategies.layer_case import LayerCase
from pytest_safemerge._strategies.layer_kinds import (
    ADAPTER_DTYPES,
    ALL_TAGS,
    LAYER_CASE_KINDS,
    LAYER_DTYPES,
    LAYER_TAGS,
    QUANTIZED_TAGS,
    options_for,
)
from pytest_safemerge._strategies.layer_shapes import layers
from pytest_safemerge._strategies.values import SEEDS, generator
from safemerge import names


def layer_cases(
    *,
    layer: str,
    kind: str = "random",
    options: Collection[str] = (),
    allowed: Collection[str] = ALL_TAGS,
    dtype: torch.dtype | str | None = None,
    adapter_dtype: torch.dtype | str | None = None,
) -> SearchStrategy[LayerCase]:
    """:class:`LayerCase` objects of one layer kind and one kind of case.

    Args:
        layer: one of :data:`LAYER_TAGS`.
        kind: one of :data:`LAYER_CASE_KINDS` (``"bias-overflow"`` needs a layer with a
            bias and ``"lora-bias"`` allowed).
        options: option tags every case carries (each must fit ``layer`` and the kind).
        allowed: every tag a case may carry (an implementation's ``layer_kinds``); other
            options are drawn among those allowed.
        dtype: the weight dtype of an unquantized layer, one of :data:`LAYER_DTYPES` (a
            ``torch.dtype`` or its name), so that a runner can generate one cell (layer
            kind x dtype) at a time; None draws it. A quantized layer's weight is its
            quantization (its bias dtype is drawn): pass None for those.
        adapter_dtype: the dtype of every adapter tensor (lora_A, lora_B, lora_bias,
            magnitude), one of :data:`ADAPTER_DTYPES`; None draws one per adapter. The
            values are drawn representable in it, and the expected results are computed
            from them as they are.
    """
    validation.check_choice("layer", layer, LAYER_TAGS)
    validation.check_choice("kind", kind, LAYER_CASE_KINDS)
    weight_dtype = _dtype_argument("dtype", dtype, LAYER_DTYPES)
    if weight_dtype is not None and layer in QUANTIZED_TAGS:
        raise InvalidArgument(
            f"dtype={dtype!r} does not apply to layer={layer!r}: a quantized layer's weight is "
            f"its {layer} quantization, and its bias dtype is drawn; pass dtype=None"
        )
    adapters_dtype = _dtype_argument("adapter_dtype", adapter_dtype, ADAPTER_DTYPES)
    allowed = frozenset(allowed)
    unknown = (set(options) | allowed) - ALL_TAGS
    if unknown:
        raise InvalidArgument(
            f"unknown tags {sorted(unknown)} in options or allowed; choose from {sorted(ALL_TAGS)}"
        )
    if layer not in allowed:
        raise InvalidArgument(f"layer={layer!r} is not in allowed={sorted(allowed)}")
    options = frozenset(options)
    possible = options_for(layer) & allowed
    if kind in ("cast-overflow", "bias-overflow"):
        possible -= {"dora"}  # DoRA renormalises: its result is bounded by the magnitude
    if kind == "bias-overflow":
        options |= {"lora-bias"}
    if not options <= possible or ("dora" in options and options & {"several", "lora-bias"}):
        raise InvalidArgument(
            f"options={sorted(options)} do not fit layer={layer!r}, kind={kind!r} with "
            f"allowed={sorted(allowed)} (possible: {sorted(possible)}; dora goes alone)"
        )
    return _layer_cases(layer, kind, options, possible, weight_dtype, adapters_dtype)


def _dtype_argument(
    name: str, value: torch.dtype | str | None, choices: tuple[torch.dtype, ...]
) -> torch.dtype | None:
    """``value`` as one of ``choices`` (a dtype or its name, ``"float16"``), or None."""
    if value is None:
        return None
    found = value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), value)
    if isinstance(found, torch.dtype) and found in choices:
        return found
    listed = names.listed(str(choice).removeprefix("torch.") for choice in choices)
    raise InvalidArgument(
        f"{name}={value!r} is not one of {listed}; pass one of them (a torch.dtype or its "
        f"name, e.g. {name}=torch.bfloat16), or {name}=None to draw it"
    )


@st.composite
def _option_sets(
    draw: st.DrawFn, required: frozenset[str], possible: frozenset[str]
) -> frozenset[str]:
    chosen = set(required)
    for option in sorted(possible - required):
        if draw(st.booleans()):
            chosen.add(option)
    if "dora" in chosen and chosen & {"several", "lora-bias"}:
        # PEFT has DoRA with a single adapter and without lora_bias: keep what is required.
        if "dora" in required:
            chosen -= {"several", "lora-bias"}
        else:
            chosen.discard("dora")
    return frozenset(chosen)


@st.composite
def _layer_cases(
    draw: st.DrawFn,
    layer: str,
    kind: str,
    required: frozenset[str],
    possible: frozenset[str],
    dtype: torch.dtype | None,
    adapter_dtype: torch.dtype | None,
) -> LayerCase:
    options = draw(_option_sets(required, possible))
    rng = generator(draw(SEEDS))
    built = draw(layers(layer, options, kind, rng, dtype))
    count = draw(st.integers(2, 3)) if "several" in options else 1
    adapters = [
        draw(adapter_parts(built, options, kind, rng, adapter_dtype, first=index == 0))
        for index in range(count)
    ]
    scale = draw(st.sampled_from((1.0, 0.5, -1.0, 2.0, 0.0, 1 / 3, 1e-3, -0.0)))
    detail = ""
    if kind in ("nan", "+inf", "-inf"):
        scale, detail = draw(planted_non_finite(adapters, kind))
    elif kind in ("cast-overflow", "bias-overflow"):
        scale, detail = draw(overflow(built, adapters, kind, rng))
    tags = frozenset({layer, *options})
    layer_module = built.finish()
    return LayerCase(
        layer_module, tuple(built.adapter(a) for a in adapters), scale, kind, tags, layer, detail
    )
