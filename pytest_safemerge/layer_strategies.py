"""Hypothesis strategies for the module-level ("layer") contract: whole layers with adapters.

A :class:`LayerCase` is a pristine layer (Linear, Embedding, Conv1d/2d/3d, a layer storing
its weight ``(in, out)``, or a real bitsandbytes Linear4bit / Linear8bitLt), the adapters
to fuse into it, a scale, and what the case is about. Cases carry tags, so that an
implementation can say which it supports (``layer_kinds``):

- layer kinds (:data:`LAYER_TAGS`): ``"linear"``, ``"embedding"``, ``"conv1d"``,
  ``"conv2d"``, ``"conv3d"``, ``"fan_in_fan_out"``, ``"nf4"``, ``"fp4"``, ``"int8"``;
- options (:data:`OPTION_TAGS`): ``"lora-bias"`` (layers with a bias, not embeddings),
  ``"dora"`` (unquantized layers, a single adapter, no lora_bias, as in PEFT),
  ``"several"`` (2 or 3 adapters with their own ranks and alphas, some rsLoRA).

Kinds of case (:data:`LAYER_CASE_KINDS`): ``"random"`` (an ordinary, finite merge), and
the ones every correct implementation refuses: ``"nan"``, ``"+inf"``, ``"-inf"`` planted
anywhere in lora_A, lora_B, lora_bias or the DoRA magnitude (at any scale, 0 included);
``"cast-overflow"``: the weight's float32 sum is beyond the range of the dtype it is
stored in (float16 for an int8 layer, whose Int8Params quantize through float16; float32
itself for float32 and 4-bit layers); ``"bias-overflow"``: the same for the bias.

Dtypes: an unquantized layer's weight is float32, float16 or bfloat16 (``dtype=`` picks
one: a cell of the suite); every adapter's tensors are float32, float16 or bfloat16
(``adapter_dtype=``), holding the values the expected results are computed from. 4-bit
layers are either narrower than a block (blocks straddle rows) or rows of 1 to 4 whole
blocks, as real layers are (:func:`rows_are_whole_blocks`).

Like :mod:`pytest_safemerge.strategies`, the bulk of every tensor comes from a drawn seed,
and what a property hinges on (sizes, dtype, options, ranks, scales, where a NaN is
planted) is drawn by Hypothesis, so that a failure shrinks to a small, readable case.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy
from torch import nn

import safemerge
from pytest_safemerge._strategies.values import representable
from safemerge import names, synthetic
from safemerge.merge.numerics import FLOAT32_RANGE_LIMIT, overflow_threshold

__all__ = [
    "ADAPTER_DTYPES",
    "ALL_TAGS",
    "LAYER_CASE_KINDS",
    "LAYER_DTYPES",
    "LAYER_TAGS",
    "OPTION_TAGS",
    "QUANTIZED_TAGS",
    "REFUSED_LAYER_KINDS",
    "UNQUANTIZED_TAGS",
    "LayerCase",
    "kinds_for",
    "layer_cases",
    "options_for",
    "rows_are_whole_blocks",
]

UNQUANTIZED_TAGS: tuple[str, ...] = names.UNQUANTIZED_KINDS
QUANTIZED_TAGS: tuple[str, ...] = names.QUANT_TYPES
LAYER_TAGS: tuple[str, ...] = names.LAYER_KINDS
OPTION_TAGS: tuple[str, ...] = names.OPTION_TAGS
ALL_TAGS: frozenset[str] = names.ALL_TAGS

REFUSED_LAYER_KINDS: tuple[str, ...] = ("nan", "+inf", "-inf", "cast-overflow", "bias-overflow")
LAYER_CASE_KINDS: tuple[str, ...] = ("random", *REFUSED_LAYER_KINDS)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Weight dtypes of the unquantized layer kinds (``layer_cases(dtype=...)``).
LAYER_DTYPES: tuple[torch.dtype, ...] = _FLOAT_DTYPES
#: Dtypes of an adapter's tensors (``layer_cases(adapter_dtype=...)``).
ADAPTER_DTYPES: tuple[torch.dtype, ...] = _FLOAT_DTYPES
#: Bias dtypes of a quantized layer (its weight has none of its own: float32 goes in).
_QUANTIZED_BIAS_DTYPES = (torch.float32, torch.float16)
_F32_MAX = float(torch.finfo(torch.float32).max)
#: bitsandbytes 4-bit blocksizes drawn; ``out * in`` must be a multiple of the blocksize.
_BLOCKSIZES = (64, 32)
_MAX_SIDE = 16
_seeds = st.integers(0, 2**32 - 1)


def _fits_blocks(out_features: int, in_features: int, blocksize: int) -> bool:
    return (out_features * in_features) % blocksize == 0


#: (out, in) pairs with sides up to 16 that bitsandbytes' 4-bit quantization accepts. Every
#: row is narrower than a block, so blocks straddle rows (bitsandbytes 0.50's CPU
#: dequantize_4bit misreads those on some CPUs: an implementation that uses it shows that
#: bug here, see benchmarks/peft_findings/bnb_cpu_dequantize_4bit.py).
_FOUR_BIT_SHAPES = {
    blocksize: tuple(
        (out_features, in_features)
        for out_features in range(1, _MAX_SIDE + 1)
        for in_features in range(1, _MAX_SIDE + 1)
        if _fits_blocks(out_features, in_features, blocksize)
    )
    for blocksize in _BLOCKSIZES
}
#: (out, in) pairs whose rows are whole blocks (in a multiple of the blocksize, 1 to 4 of
#: them), as real layers' are: each block lies within one row, and a row holds several.
_ALIGNED_FOUR_BIT_SHAPES = {
    blocksize: tuple(
        (out_features, in_features)
        for in_features in (32, 64, 128)
        if in_features % blocksize == 0
        for out_features in range(1, 5)
    )
    for blocksize in _BLOCKSIZES
}


def rows_are_whole_blocks(case: LayerCase) -> bool:
    """A 4-bit case whose ``in_features`` is a multiple of its blocksize (no block
    straddles two rows); False for every other case."""
    state = getattr(getattr(case.layer, "weight", None), "quant_state", None)
    if case.layer_tag not in names.FOUR_BIT_TYPES or state is None:
        return False
    return int(state.shape[1]) % int(state.blocksize) == 0


def options_for(layer: str) -> frozenset[str]:
    """The option tags a layer kind can carry (see the module docstring)."""
    options = {"several"}
    if layer != "embedding":
        options.add("lora-bias")
    if layer not in QUANTIZED_TAGS:
        options.add("dora")
    return frozenset(options)


def kinds_for(layer: str, allowed: Collection[str] = ALL_TAGS) -> tuple[str, ...]:
    """The case kinds :func:`layer_cases` can make for ``layer`` with these tags allowed."""
    kinds = ["random", "nan", "+inf", "-inf", "cast-overflow"]
    if "lora-bias" in options_for(layer) and "lora-bias" in allowed:
        kinds.append("bias-overflow")
    return tuple(kinds)


@dataclass(frozen=True, eq=False)
class LayerCase:
    """One call ``fuse_layer(layer, adapters, scale)``.

    Attributes:
        layer: the pristine layer, on the CPU. Never hand it to the code under test:
            :meth:`fresh_layer` gives a copy.
        adapters: the adapters, pristine (:meth:`fresh_adapters` gives copies).
        scale: the overall scale (PEFT's ``lora_scale``).
        kind: ``"random"`` or one of :data:`REFUSED_LAYER_KINDS`.
        tags: the layer kind's tag and the options the case uses.
        layer_tag: the layer kind's tag alone.
        detail: what was planted where (empty for random cases).
    """

    layer: nn.Module
    adapters: tuple[safemerge.LoraAdapter, ...]
    scale: float
    kind: str
    tags: frozenset[str]
    layer_tag: str
    detail: str = ""

    @property
    def must_refuse(self) -> bool:
        return self.kind in REFUSED_LAYER_KINDS

    @property
    def quantized(self) -> bool:
        return self.layer_tag in QUANTIZED_TAGS

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(tag for tag in OPTION_TAGS if tag in self.tags)

    def fresh_layer(self, device: str | torch.device = "cpu") -> nn.Module:
        """A copy of the layer, quantization state included, on ``device`` (bitsandbytes
        moves a quantized weight's bytes and state as they are)."""
        return copy.deepcopy(self.layer).to(device)

    def fresh_adapters(self, device: str | torch.device = "cpu") -> list[safemerge.LoraAdapter]:
        """Copies of the adapters, on ``device`` (strides kept)."""
        return [_adapter_copy(adapter, device) for adapter in self.adapters]

    def describe(self) -> str:
        layer = _describe_layer(self.layer, self.layer_tag)
        adapters = ", ".join(_describe_adapter(adapter) for adapter in self.adapters)
        return f"{layer}; adapters [{adapters}]; scale {self.scale!r}"


def _adapter_copy(adapter: safemerge.LoraAdapter, device: str | torch.device) -> Any:
    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, copy=True)

    return replace(
        adapter,
        lora_A=adapter.lora_A.to(device, copy=True),
        lora_B=adapter.lora_B.to(device, copy=True),
        lora_bias=moved(adapter.lora_bias),
        magnitude=moved(adapter.magnitude),
    )


def _describe_layer(layer: Any, tag: str) -> str:
    weight = layer.weight
    bias = getattr(layer, "bias", None)
    has_bias = f"bias {str(bias.dtype).removeprefix('torch.')}" if bias is not None else "no bias"
    if tag == "int8":
        return f"int8 Linear8bitLt {tuple(weight.shape)} (threshold {layer.state.threshold}, {has_bias})"
    if tag in ("nf4", "fp4"):
        state = weight.quant_state
        return (
            f"{tag} Linear4bit {tuple(state.shape)} (blocksize {state.blocksize}, "
            f"nested {state.nested}, {has_bias})"
        )
    dtype = str(weight.dtype).removeprefix("torch.")
    return f"{tag} {type(layer).__name__} weight {tuple(weight.shape)} {dtype} ({has_bias})"


def _describe_adapter(adapter: safemerge.LoraAdapter) -> str:
    parts = [f"rank {adapter.rank}", f"alpha {adapter.alpha}"]
    if adapter.use_rslora:
        parts.append("rslora")
    parts.append(f"scale {adapter.scale:.6g}")
    if adapter.lora_A.dtype != torch.float32:
        parts.append(str(adapter.lora_A.dtype).removeprefix("torch."))
    if adapter.lora_bias is not None:
        parts.append("lora_bias")
    if adapter.magnitude is not None:
        parts.append("dora")
    return " ".join(parts)


# --- argument checks --------------------------------------------------------------------------


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
    if layer not in LAYER_TAGS:
        raise InvalidArgument(f"layer={layer!r} is not one of {LAYER_TAGS}; pass one of them")
    if kind not in LAYER_CASE_KINDS:
        raise InvalidArgument(f"kind={kind!r} is not one of {LAYER_CASE_KINDS}; pass one of them")
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
    generator = torch.Generator().manual_seed(draw(_seeds))
    built = draw(_layers(layer, options, kind, generator, dtype))
    count = draw(st.integers(2, 3)) if "several" in options else 1
    adapters = [
        draw(_adapters(built, options, kind, generator, adapter_dtype, first=index == 0))
        for index in range(count)
    ]
    scale = draw(st.sampled_from((1.0, 0.5, -1.0, 2.0, 0.0, 1 / 3, 1e-3, -0.0)))
    detail = ""
    if kind in ("nan", "+inf", "-inf"):
        scale, detail = draw(_planted_non_finite(adapters, kind))
    elif kind in ("cast-overflow", "bias-overflow"):
        scale, detail = draw(_overflow(built, adapters, kind, generator))
    tags = frozenset({layer, *options})
    layer_module = built.finish()
    return LayerCase(
        layer_module, tuple(built.adapter(a) for a in adapters), scale, kind, tags, layer, detail
    )


# --- layers -------------------------------------------------------------------------------------


@dataclass
class _Built:
    """A layer under construction: its float weight (and bias) are still editable, so a
    case can plant values before a quantized layer is quantized."""

    tag: str
    module: nn.Module | None  # the unquantized layer; None until a quantized one is built
    weight: torch.Tensor  # float, the layer's own layout
    bias: torch.Tensor | None
    dtype: torch.dtype  # the weight's dtype (float32 for quantized layers: what goes in)
    in_features: int  # lora_A.shape[1]
    out_features: int  # lora_B.shape[0]
    kernel: tuple[int, ...]
    quant: dict[str, Any]

    @property
    def transposed(self) -> bool:
        return self.tag in ("embedding", "fan_in_fan_out")

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as the matrix M of ``safemerge.matrix_form`` (a view)."""
        return self.weight.view(self.weight.shape[0], -1)

    def adapter(self, parts: dict[str, Any]) -> safemerge.LoraAdapter:
        return safemerge.LoraAdapter(
            parts["lora_A"],
            parts["lora_B"],
            alpha=parts["alpha"],
            use_rslora=parts["use_rslora"],
            lora_bias=parts["lora_bias"],
            magnitude=parts["magnitude"],
            fan_in_fan_out=self.tag == "fan_in_fan_out",
        )

    def finish(self) -> nn.Module:
        if self.module is not None:
            return self.module
        layer: nn.Module = synthetic.quantized_linear(
            self.weight, self.tag, bias=self.bias, **self.quant
        )
        return layer


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


@st.composite
def _layers(
    draw: st.DrawFn,
    tag: str,
    options: frozenset[str],
    kind: str,
    generator: torch.Generator,
    dtype: torch.dtype | None,
) -> _Built:
    needs_bias = "lora-bias" in options
    has_bias = tag != "embedding" and (needs_bias or draw(st.booleans()))
    std = draw(st.sampled_from((1.0, 0.02, 30.0) if tag not in QUANTIZED_TAGS else (1.0, 0.02)))
    if tag in QUANTIZED_TAGS:
        return draw(_quantized(tag, has_bias, std, generator))
    if dtype is None:
        dtype = draw(st.sampled_from(_FLOAT_DTYPES))
    kernel: tuple[int, ...] = ()
    module: nn.Module
    if tag in ("linear", "fan_in_fan_out", "embedding"):
        out_features = draw(st.integers(1, _MAX_SIDE))
        in_features = draw(st.integers(1, _MAX_SIDE))
        if tag == "linear":
            module = nn.Linear(in_features, out_features, bias=has_bias)
        elif tag == "fan_in_fan_out":
            module = synthetic.TransposedLinear(in_features, out_features, bias=has_bias)
        else:
            module = nn.Embedding(in_features, out_features)  # (num_embeddings, dim)
    else:
        dims = int(tag[4])
        out_features = draw(st.integers(1, 8))
        in_features = draw(st.integers(1, 4))
        kernel = tuple(draw(st.integers(1, 3 if dims < 3 else 2)) for _ in range(dims))
        conv: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        module = conv(in_features, out_features, kernel, bias=has_bias)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(_normal(tuple(parameter.shape), std, generator))
    module = module.to(dtype)
    parts: Any = module
    return _Built(
        tag,
        module,
        parts.weight.data,
        parts.bias.data if has_bias else None,
        dtype,
        in_features,
        out_features,
        kernel,
        {},
    )


@st.composite
def _quantized(
    draw: st.DrawFn, tag: str, has_bias: bool, std: float, generator: torch.Generator
) -> _Built:
    quant: dict[str, Any]
    if tag == "int8":
        out_features = draw(st.integers(1, _MAX_SIDE))
        in_features = draw(st.integers(1, _MAX_SIDE))
        quant = {"threshold": draw(st.sampled_from((0.0, 6.0)))}
    else:
        blocksize = draw(st.sampled_from(_BLOCKSIZES))
        # Rows narrower than a block (blocks straddle rows), or rows of whole blocks.
        shapes = _ALIGNED_FOUR_BIT_SHAPES if draw(st.booleans()) else _FOUR_BIT_SHAPES
        out_features, in_features = draw(st.sampled_from(shapes[blocksize]))
        quant = {"blocksize": blocksize, "nested": draw(st.booleans())}
    weight = _normal((out_features, in_features), std, generator)
    bias = None
    if has_bias:
        bias_dtype = draw(st.sampled_from(_QUANTIZED_BIAS_DTYPES))
        bias = _normal((out_features,), std, generator).to(bias_dtype)
    return _Built(tag, None, weight, bias, torch.float32, in_features, out_features, (), quant)


# --- adapters -----------------------------------------------------------------------------------


@st.composite
def _adapters(
    draw: st.DrawFn,
    built: _Built,
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
    lora_A = _normal((rank, built.in_features, *built.kernel), spread, generator)
    lora_B = _normal(
        (built.out_features, rank, *(1 for _ in built.kernel)),
        draw(st.sampled_from((0.02, 1.0, 0.0))),
        generator,
    )
    lora_bias = None
    if "lora-bias" in options and (first or draw(st.booleans())):
        lora_bias = _normal((built.out_features,), draw(st.sampled_from((0.02, 1.0))), generator)
    magnitude = None
    if "dora" in options:
        magnitude = torch.rand(built.out_features, generator=generator) * 2 + 0.25
    return {
        "lora_A": lora_A.to(dtype),
        "lora_B": lora_B.to(dtype),
        "alpha": alpha,
        "use_rslora": use_rslora,
        "lora_bias": None if lora_bias is None else lora_bias.to(dtype),
        "magnitude": None if magnitude is None else magnitude.to(dtype),
    }


def _adapter_scale(parts: dict[str, Any]) -> float:
    rank = int(parts["lora_A"].shape[0])
    alpha = float(rank) if parts["alpha"] is None else float(parts["alpha"])
    return alpha / math.sqrt(rank) if parts["use_rslora"] else alpha / rank


# --- adversarial cases --------------------------------------------------------------------------


@st.composite
def _planted_non_finite(
    draw: st.DrawFn, adapters: list[dict[str, Any]], kind: str
) -> tuple[float, str]:
    value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
    index = draw(st.integers(0, len(adapters) - 1))
    parts = adapters[index]
    names = [
        name for name in ("lora_A", "lora_B", "lora_bias", "magnitude") if parts[name] is not None
    ]
    name = draw(st.sampled_from(names))
    target = parts[name]
    numel = target.numel()
    position = draw(st.sampled_from(("last", "first", "any")))
    flat = {"last": numel - 1, "first": 0}.get(position)
    if flat is None:
        flat = draw(st.integers(0, numel - 1))
    target.view(-1)[flat] = value
    # Any scale: 0 * NaN and 0 * Inf are NaN, and so is a NaN behind a zero lora_B.
    scale = draw(st.sampled_from((1.0, 0.0, -0.0, 0.5, -1.0, 1e-38, 1e-30, 1e30)))
    where = f"adapters[{index}].{name}"
    return scale, f"{kind} at {where}, flat index {flat} of {numel}"


@st.composite
def _overflow(
    draw: st.DrawFn,
    built: _Built,
    adapters: list[dict[str, Any]],
    kind: str,
    generator: torch.Generator,
) -> tuple[float, str]:
    """Plant a weight (or bias) value near its range's edge and adapters whose deltas push
    it beyond; with several adapters the push is shared, so that each alone may stay in
    range and only their sum overflows (an implementation merging one adapter at a time
    must roll the first back)."""
    if kind == "cast-overflow":
        storage = _weight_storage_dtype(built)
        out_size = built.matrix.shape[0]
    else:
        assert built.bias is not None
        storage = built.bias.dtype
        out_size = built.bias.numel()
    threshold = overflow_threshold(storage)
    largest = float(torch.finfo(storage).max)
    sign = draw(st.sampled_from((1.0, -1.0)))
    start = representable(draw(st.sampled_from((0.5, 0.75, 1.0))) * largest, storage)
    # bfloat16 has float32's range: beyond its threshold there is room for less than one
    # of its roundings near the max, so a sum merged in steps (each rounded, as PEFT does)
    # may come back in range. With several adapters the float32 sum overflows instead.
    in_steps = storage == torch.bfloat16 and len(adapters) > 1
    if math.isinf(threshold) or in_steps:  # the float32 sum itself overflows
        target = start + draw(st.sampled_from((0.75, 1.0))) * _F32_MAX  # at least 1.25 x max
        beyond = f"beyond float32's range ({_F32_MAX:g}): the float32 sum is Inf"
    else:
        ceiling = min(4 * threshold, _F32_MAX)
        target = threshold + draw(st.sampled_from((0.05, 0.25, 0.5, 0.95))) * (ceiling - threshold)
        beyond = f"finite in float32, beyond {storage}'s threshold {threshold:g}"
    push = (target - start) / len(adapters)
    coefficients = [_adapter_scale(parts) for parts in adapters]
    split = kind == "cast-overflow"  # a weight's delta has two factors, a bias's one

    def plantable(scale: float) -> bool:
        return all(
            _planted_factors(push / (scale * c), parts["lora_A"].dtype, split=split) is not None
            for parts, c in zip(adapters, coefficients, strict=True)
        )

    feasible = [s for s in _OVERFLOW_SCALES if plantable(s)]
    if not feasible:  # half adapters push a float32-range sum only at larger scales
        feasible = [s for s in _LARGE_OVERFLOW_SCALES if plantable(s)]
    assert feasible, f"no scale plants {push:g} into {[p['lora_A'].dtype for p in adapters]}"
    scale = draw(st.sampled_from(feasible))
    pushes = []
    if kind == "cast-overflow":
        row = draw(st.integers(0, built.matrix.shape[0] - 1))
        column = draw(st.integers(0, built.matrix.shape[1] - 1))
        built.matrix[row, column] = sign * start
        for parts, coefficient in zip(adapters, coefficients, strict=True):
            planted = _plant_delta(built, parts, row, column, sign * push / (scale * coefficient))
            pushes.append(scale * coefficient * planted)
        where = f"weight matrix [{row}, {column}]"
    else:
        assert built.bias is not None
        row = draw(st.integers(0, out_size - 1))
        built.bias[row] = sign * start
        for parts, coefficient in zip(adapters, coefficients, strict=True):
            if parts["lora_bias"] is None:
                lora_bias = _normal((built.out_features,), 0.02, generator)
                parts["lora_bias"] = lora_bias.to(parts["lora_A"].dtype)
            factors = _planted_factors(
                sign * push / (scale * coefficient), parts["lora_bias"].dtype, split=False
            )
            assert factors is not None
            parts["lora_bias"][row] = factors[1]
            pushes.append(scale * coefficient * factors[1])
        where = f"bias[{row}]"
    # Each planted value is rounded away from zero into its adapter's dtype: the sum is at
    # least the target (beyond float32's range, a little more, when the target is near it).
    total = sign * start + math.fsum(pushes)
    if abs(total) >= FLOAT32_RANGE_LIMIT:
        beyond = f"beyond float32's range ({_F32_MAX:g}): the float32 sum is Inf"
    detail = (
        f"{where} = {sign * start:g} plus "
        + " + ".join(f"{one:g}" for one in pushes)
        + f" = {total:g}: {beyond}"
    )
    return scale, detail


def _weight_storage_dtype(built: _Built) -> torch.dtype:
    """The dtype the merged weight is stored in, as far as its range goes."""
    if built.tag == "int8":
        return torch.float16  # Int8Params quantize through float16
    return built.dtype  # float32 for 4-bit layers: the absmax is float32


def _plant_delta(
    built: _Built, parts: dict[str, Any], row: int, column: int, value: float
) -> float:
    """Make rank component 0 of the adapter add ``value`` (times its coefficient) at
    ``M[row, column]`` and nothing elsewhere, as a power of two (1 when ``value`` fits the
    adapter's dtype) times ``value`` over it rounded away from zero into that dtype.
    Returns the product planted (``value`` or a little more in magnitude)."""
    lora_A = parts["lora_A"].view(parts["lora_A"].shape[0], -1)
    lora_B = parts["lora_B"].view(parts["lora_B"].shape[0], -1)
    factors = _planted_factors(value, lora_A.dtype, split=True)
    assert factors is not None, f"{value:g} cannot be planted in {lora_A.dtype}"
    power, rest = factors
    lora_A[0].zero_()
    lora_B[:, 0].zero_()
    if built.transposed:  # M += lora_A^T @ lora_B^T
        lora_A[0, row] = rest
        lora_B[column, 0] = power
    else:  # M += lora_B @ lora_A
        lora_B[row, 0] = power
        lora_A[0, column] = rest
    return power * rest


#: Scales an overflow case draws from, when its planted values fit the adapters' dtypes.
_OVERFLOW_SCALES = (1.0, 0.5, 2.0, -1.0, 4.0, 1e-3, 1e30)
#: Otherwise (float16 adapters, whose largest value is 65504, pushing a bias past float16's
#: range, or a sum past float32's or bfloat16's).
_LARGE_OVERFLOW_SCALES = (16.0, 1e35)


def _planted_factors(
    value: float, dtype: torch.dtype, *, split: bool
) -> tuple[float, float] | None:
    """``(power, rest)``, both exact in ``dtype``, with ``power * rest`` equal to ``value``
    or a little beyond it in magnitude (``rest`` a normal number, rounded away from zero);
    None when there are none. ``power`` is 1 when ``value`` fits ``dtype`` and always
    without ``split`` (a single factor, as a lora_bias), else a power of two near the
    square root of ``|value|``."""
    info = torch.finfo(dtype)
    smallest, largest = float(info.smallest_normal), float(info.max)
    magnitude = abs(value)
    if magnitude == 0 or not math.isfinite(magnitude):
        return None
    power = 1.0
    if split and not smallest <= magnitude <= largest / 2:
        power = 2.0 ** round(math.log2(magnitude) / 2)
    rest = magnitude / power  # exact: a power of two
    if not (smallest <= power <= largest and smallest <= rest <= largest):
        return None
    rounded = _away_from_zero(rest, dtype)
    return None if rounded > largest else (power, math.copysign(rounded, value))


def _away_from_zero(magnitude: float, dtype: torch.dtype) -> float:
    """The least ``dtype`` value at or above ``magnitude`` (a positive normal float)."""
    info = torch.finfo(dtype)
    spacing = math.ldexp(float(info.eps), math.frexp(magnitude)[1] - 1)
    return math.ceil(magnitude / spacing) * spacing
