"""Hypothesis strategies for testing LoRA merge code: weights, adapters, scales, adversarial cases.

Import them in your own ``@given`` tests::

    from hypothesis import given
    from pytest_safemerge.strategies import lora_adapters, scales, weights

Whole layers with adapters for the module-level contract (:func:`layer_cases`) live in
:mod:`pytest_safemerge.layer_strategies` and are re-exported here.

Every strategy is a plural noun returning a ``SearchStrategy``; options are keyword-only
and checked when the strategy is built, before anything is drawn (a bad option raises
``hypothesis.errors.InvalidArgument`` naming ``name=value`` and the fix).

How values are made: the bulk of a tensor comes from a drawn seed through
``torch.Generator`` (fast at any size), while what a property hinges on (sizes, the
position and value of a planted NaN, the magnitudes near a dtype's limit, the scale) is
drawn by Hypothesis itself. A shrunk failure therefore reads as a small, concrete case:
a 1x1 weight, rank 1, a NaN in the last element of ``lora_A``, scale 1.0.

This module uses only safemerge's public names and ``safemerge.numerics`` (dtype facts:
``SUPPORTED_DTYPES``, ``overflow_threshold``, ``int_view``). It imports torch at module
top; the plugin's entry module does not import it, so pytest stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

import safemerge
from pytest_safemerge.layer_strategies import LayerCase, layer_cases
from safemerge import names
from safemerge.merge.numerics import SUPPORTED_DTYPES, int_view, overflow_threshold, unravel

__all__ = [
    "ADAPTER_KINDS",
    "ADVERSARIAL_KINDS",
    "MERGE_CASE_KINDS",
    "AdversarialAdapter",
    "LayerCase",
    "MergeCase",
    "QuantizationConfig",
    "adversarial_adapters",
    "layer_cases",
    "lora_adapters",
    "merge_cases",
    "quantization_configs",
    "scales",
    "weights",
]

#: Adversarial adapters that need no particular weight (see :func:`adversarial_adapters`).
ADAPTER_KINDS: tuple[str, ...] = (
    "nan",
    "+inf",
    "-inf",
    "fp16-product-overflow",
    "subnormal",
    "cancellation",
    "non-contiguous",
)
#: Every adversarial kind; ``"cast-overflow"`` needs the weight, so only :func:`merge_cases`
#: makes it.
ADVERSARIAL_KINDS: tuple[str, ...] = (*ADAPTER_KINDS, "cast-overflow")
#: What :func:`merge_cases` can make: ordinary random cases and every adversarial kind.
MERGE_CASE_KINDS: tuple[str, ...] = ("random", *ADVERSARIAL_KINDS)
#: Kinds every correct implementation must refuse (whatever the weight and the scale).
MUST_REFUSE_KINDS: frozenset[str] = frozenset({"nan", "+inf", "-inf", "cast-overflow"})

ELEMENTS = ("normal", "bits")
QUANT_TYPES = names.QUANT_TYPES
FP16_MAX = 65504.0
F32_MAX = float(torch.finfo(torch.float32).max)
#: Ordinary and extreme scales, in the order they shrink to: 1.0 first.
#: 1e-38 puts ``scale * B`` among float32's subnormals; 1e30 overflows most deltas.
ORDINARY_SCALES = (1.0, 0.5, 2.0, -1.0, 0.0, -0.0, 1 / 3, 1e-6, 1e6)
EXTREME_SCALES = (1e-30, -1e-30, 1e-38, -1e-38, 1e30, -1e30)
#: Standard deviations of the seeded bulk of weights and adapters (first is the shrink target).
_STDS = (1.0, 0.02, 1e-3, 0.0, 30.0)

_seeds = st.integers(0, 2**32 - 1)
#: Up to this many elements, "bits" weights draw every pattern through Hypothesis.
_DIRECT_BITS = 64


# --- argument checks (before anything is drawn) ---------------------------------------------


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in dtypes)


def _check_dtype(name: str, value: object, allowed: Sequence[torch.dtype]) -> None:
    if value not in allowed:
        raise InvalidArgument(
            f"{name}={value!r} is not supported; pass one of {_dtype_names(allowed)}"
        )


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int (got {type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidArgument(f"{name}={value!r} must be {bound}; pass e.g. {name}={low}")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgument(f"{name}={value!r} is not one of {choices}; pass one of them")


def _check_bool_or_none(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be True, False, or None (None draws both)")


def _check_kinds(
    name: str, kinds: object, allowed: Sequence[str], hint: str = ""
) -> tuple[str, ...]:
    if isinstance(kinds, str) or not isinstance(kinds, Sequence | frozenset | set):
        raise InvalidArgument(
            f"{name}={kinds!r} must be a sequence of kind names, e.g. {name}=({allowed[0]!r},)"
        )
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgument(f"{name}={kinds!r} is empty; pass at least one of {allowed}")
    unknown = [kind for kind in kinds if kind not in allowed]
    if unknown:
        raise InvalidArgument(
            f"{name}={kinds!r} contains unknown kinds {unknown}; choose from {allowed}{hint}"
        )
    return kinds


# --- small helpers ------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _representable(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (as torch casts), back as a Python float."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype).to(torch.float64))


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return float(info.smallest_normal) * float(info.eps)


def _seeded_normal(
    shape: tuple[int, ...], std: float, dtype: torch.dtype, generator: torch.Generator
) -> torch.Tensor:
    values = torch.randn(shape, generator=generator) * std
    if dtype != torch.float32:
        values = values.clamp(-_dtype_max(dtype), _dtype_max(dtype))
    return values.to(dtype)


def _seeded_factors(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
    stds: SearchStrategy[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_A`` (rank, in) and ``lora_B`` (out, rank) from one drawn seed, each with a
    drawn standard deviation."""
    generator = _generator(draw(_seeds))
    stds = stds if stds is not None else st.sampled_from(_STDS)
    lora_A = _seeded_normal((rank, in_features), draw(stds), dtype, generator)
    lora_B = _seeded_normal((out_features, rank), draw(stds), dtype, generator)
    return lora_A, lora_B


# --- bit patterns ---------------------------------------------------------------------------


def _bit_width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def _largest_finite_magnitude_bits(dtype: torch.dtype) -> int:
    """The bit pattern of ``finfo(dtype).max``: every smaller magnitude pattern is finite."""
    largest = torch.tensor([_dtype_max(dtype)], dtype=torch.float32).to(dtype)
    return int(int_view(largest).item())


def _signed_pattern(negative: bool, magnitude: int, width: int) -> int:
    """The signed integer whose two's complement bits are ``sign | magnitude``."""
    return magnitude - (1 << (width - 1)) if negative else magnitude


def _from_patterns(patterns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    int_dtype = int_view(torch.empty(0, dtype=dtype)).dtype
    return patterns.to(int_dtype).view(dtype)


def _finite_patterns(dtype: torch.dtype) -> SearchStrategy[int]:
    """Signed bit patterns of finite ``dtype`` values; they shrink toward 0 bits (+0.0)."""
    width = _bit_width(dtype)
    largest = _largest_finite_magnitude_bits(dtype)
    return st.builds(
        lambda magnitude, negative: _signed_pattern(negative, magnitude, width),
        st.integers(0, largest),
        st.booleans(),
    )


# --- weights --------------------------------------------------------------------------------


def _special_values(dtype: torch.dtype) -> tuple[float, ...]:
    info = torch.finfo(dtype)
    tiny = _smallest_subnormal(dtype)
    largest = float(info.max)
    return (0.0, -0.0, 1.0, -1.0, largest, -largest, float(info.smallest_normal), tiny, -tiny)


def weights(
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    shape: tuple[int, int] | None = None,
    max_side: int = 32,
    elements: str = "normal",
) -> SearchStrategy[torch.Tensor]:
    """2-D weight tensors ``(out_features, in_features)`` of a supported dtype.

    Args:
        dtype: one of ``safemerge.numerics.SUPPORTED_DTYPES`` (float32, float16,
            bfloat16, float8_e4m3fn, float8_e5m2); ``None`` draws one of them.
        shape: a fixed ``(out, in)``; ``None`` draws each side in ``1..max_side``.
        max_side: the largest side drawn when ``shape`` is None.
        elements: ``"normal"``: a seeded normal bulk (std from 0 to 30, clamped to the
            dtype's range) with a few Hypothesis-drawn special values written in (signed
            zeros, +-max, the smallest normal, subnormals, ordinary floats).
            ``"bits"``: raw bit patterns of finite values (made from integers and viewed
            as the dtype, so bfloat16 and float8 work without numpy), so every
            representable value, subnormals and -0.0 included, can appear. Up to 64
            elements, every pattern is drawn by Hypothesis and shrinks toward 0 bits
            (+0.0); larger tensors are seeded random patterns with a few drawn ones.

    Values are always finite (no NaN or Inf).
    """
    if dtype is not None:
        _check_dtype("dtype", dtype, SUPPORTED_DTYPES)
    if shape is not None and (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise InvalidArgument(
            f"shape={shape!r} must be a tuple of two positive ints (out, in), "
            f"e.g. shape=(4, 8), or None to draw sides up to max_side"
        )
    _check_int("max_side", max_side, low=1)
    _check_choice("elements", elements, ELEMENTS)
    return _weights(dtype, shape, max_side, elements)


@st.composite
def _weights(
    draw: st.DrawFn,
    dtype: torch.dtype | None,
    shape: tuple[int, int] | None,
    max_side: int,
    elements: str,
) -> torch.Tensor:
    if dtype is None:
        dtype = draw(st.sampled_from(SUPPORTED_DTYPES))
    if shape is None:
        shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    numel = shape[0] * shape[1]
    positions = st.integers(0, numel - 1)
    if elements == "bits":
        if numel <= _DIRECT_BITS:
            # Small tensors: every pattern drawn by Hypothesis, so each shrinks to 0 bits.
            patterns = torch.tensor(
                [draw(_finite_patterns(dtype)) for _ in range(numel)], dtype=torch.int64
            )
        else:
            # Larger ones: seeded random patterns (fast), a few overwritten by Hypothesis.
            width = _bit_width(dtype)
            generator = _generator(draw(_seeds))
            largest = _largest_finite_magnitude_bits(dtype)
            magnitude = torch.randint(0, largest + 1, (numel,), generator=generator)
            negative = torch.randint(0, 2, (numel,), generator=generator)
            patterns = magnitude - negative * (1 << (width - 1))
            for index, pattern in draw(
                st.lists(st.tuples(positions, _finite_patterns(dtype)), max_size=8)
            ):
                patterns[index] = pattern
        return _from_patterns(patterns, dtype).reshape(shape)
    std = draw(st.sampled_from(_STDS))
    weight = _seeded_normal(shape, std, dtype, _generator(draw(_seeds)))
    largest_value = _dtype_max(dtype)
    values = st.one_of(
        st.sampled_from(_special_values(dtype)),
        st.floats(-largest_value, largest_value, allow_nan=False, allow_infinity=False),
    )
    flat = weight.view(-1)
    for index, value in draw(st.lists(st.tuples(positions, values), max_size=min(numel, 4))):
        # Rounding to the dtype cannot leave its range: |value| <= max.
        flat[index] = value
    return weight


# --- scales ---------------------------------------------------------------------------------


def scales(*, extreme: bool = True) -> SearchStrategy[float]:
    """Overall merge scales (PEFT's ``lora_scale``), shrinking toward 1.0.

    Ordinary values (1, 0.5, 2, -1, 1/3, 1e-6, 1e6, any float in [-10, 10]) and both
    zeros; with ``extreme=True`` also tiny (+-1e-30, +-1e-38: ``scale * B`` lands among
    float32's subnormals) and huge (+-1e30) values, and any float up to +-1e36. Always
    finite.
    """
    if not isinstance(extreme, bool):
        raise InvalidArgument(f"extreme={extreme!r} must be True or False")
    parts = [st.sampled_from(ORDINARY_SCALES), st.floats(-10, 10, allow_nan=False)]
    if extreme:
        parts.insert(1, st.sampled_from(EXTREME_SCALES))
        parts.append(st.floats(-1e36, 1e36, allow_nan=False, allow_infinity=False))
    return st.one_of(*parts)


# --- LoRA adapters --------------------------------------------------------------------------

ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_alpha(alpha: object) -> None:
    if alpha is None or isinstance(alpha, SearchStrategy):
        return
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InvalidArgument(
            f"alpha={alpha!r} must be a finite number, a strategy (st.none() for alpha = rank), "
            f"or None to draw it"
        )


def lora_adapters(
    *,
    out_features: int,
    in_features: int,
    rank: int | None = None,
    max_rank: int = 8,
    dtype: torch.dtype = torch.float32,
    alpha: float | SearchStrategy[float | None] | None = None,
    rslora: bool | None = None,
) -> SearchStrategy[safemerge.LoraAdapter]:
    """``safemerge.LoraAdapter`` objects for a ``(out_features, in_features)`` weight.

    ``lora_A`` is ``(rank, in_features)`` and ``lora_B`` is ``(out_features, rank)``, filled
    from a seed with drawn standard deviations (0 included: an adapter that adds nothing).

    Args:
        rank: a fixed rank, or ``None`` to draw one in ``1..max_rank``: ranks above
            ``min(out_features, in_features)`` (a rank-deficient product) are drawn
            whenever ``max_rank`` allows them, and are favoured.
        dtype: the adapter's dtype: float32, float16 or bfloat16.
        alpha: a fixed alpha; a strategy to draw it from (``st.none()`` for PEFT's
            default alpha = rank); ``None`` draws None, common values or any float in
            [-64, 64].
        rslora: scale by ``alpha / sqrt(rank)``; ``None`` draws both.
    """
    _check_int("out_features", out_features, low=1)
    _check_int("in_features", in_features, low=1)
    _check_int("max_rank", max_rank, low=1)
    if rank is not None:
        _check_int("rank", rank, low=1)
    _check_dtype("dtype", dtype, ADAPTER_DTYPES)
    _check_alpha(alpha)
    _check_bool_or_none("rslora", rslora)
    return _lora_adapters(out_features, in_features, rank, max_rank, dtype, alpha, rslora)


def _ranks(out_features: int, in_features: int, max_rank: int) -> SearchStrategy[int]:
    smallest = min(out_features, in_features)
    parts = [st.integers(1, max_rank)]
    if max_rank > smallest:
        parts.append(st.integers(smallest + 1, max_rank))
    return st.one_of(*parts)


@st.composite
def _lora_adapters(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    rank: int | None,
    max_rank: int,
    dtype: torch.dtype,
    alpha: Any,
    rslora: bool | None,
) -> safemerge.LoraAdapter:
    if rank is None:
        rank = draw(_ranks(out_features, in_features, max_rank))
    if alpha is None:
        alpha = draw(
            st.one_of(st.none(), st.sampled_from((8.0, 16.0, 1.0, 32.0)), st.floats(-64, 64))
        )
    elif isinstance(alpha, SearchStrategy):
        alpha = draw(alpha)
    if rslora is None:
        rslora = draw(st.booleans())
    lora_A, lora_B = _seeded_factors(draw, out_features, in_features, rank, dtype)
    return safemerge.LoraAdapter(lora_A, lora_B, alpha=alpha, use_rslora=rslora)


# --- adversarial adapters -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AdversarialAdapter:
    """An adapter built to break merge code in one particular way.

    Attributes:
        adapter: the ``safemerge.LoraAdapter`` (float32 factors, alpha = rank: scale 1).
        kind: one of :data:`ADAPTER_KINDS`.
        scale: the overall scale the case is meant for (for "fp16-product-overflow",
            small enough that a float32 merge into a zero weight fits the weight dtype).
        detail: what was planted where, e.g. ``"nan at lora_A[1, 4] (the last element)"``.
    """

    adapter: safemerge.LoraAdapter
    kind: str
    scale: float
    detail: str

    @property
    def must_refuse(self) -> bool:
        """Every correct implementation refuses to fuse this adapter, into any weight."""
        return self.kind in MUST_REFUSE_KINDS


def adversarial_adapters(
    *,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype = torch.bfloat16,
    kinds: Sequence[str] = ADAPTER_KINDS,
    max_rank: int = 4,
) -> SearchStrategy[AdversarialAdapter]:
    """Adapters for a ``(out_features, in_features)`` weight of ``weight_dtype`` that break
    careless merge code; each comes labelled with its kind (see :class:`AdversarialAdapter`).

    Kinds:
        ``"nan"``, ``"+inf"``, ``"-inf"``: that value planted in ``lora_A`` or ``lora_B``
        at a drawn position, the last element included (it shrinks to the last).
        ``"fp16-product-overflow"``: single products ``|B[i,k] * A[k,j]|`` above 65504
        (float16's max), all finite in float32: a merge computed in float16 sees Inf.
        ``"subnormal"``: ``B @ A`` is exactly a row of ``weight_dtype`` subnormals (B is
        one-hot): a merge that flushes subnormals to zero loses it.
        ``"cancellation"``: the second half of the rank repeats the first with A
        negated, integer values up to 256 (products up to 2**16): ``B @ A`` is exactly 0,
        and float32 sums it exactly in any order (every partial sum is an integer
        below 2**24).
        ``"non-contiguous"``: ``lora_A`` and ``lora_B`` are strided or transposed views
        (rank at least 2, so they are never contiguous).

    ``"cast-overflow"`` depends on the weight: :func:`merge_cases` makes it.
    """
    _check_int("out_features", out_features, low=1)
    _check_int("in_features", in_features, low=1)
    _check_dtype("weight_dtype", weight_dtype, SUPPORTED_DTYPES)
    hint = ' ("cast-overflow" needs the weight: use merge_cases(kinds=("cast-overflow",)))'
    kinds = _check_kinds("kinds", kinds, ADAPTER_KINDS, hint)
    _check_int("max_rank", max_rank, low=1, high=64)
    return st.one_of(
        *(
            _ADAPTER_BUILDERS[kind](out_features, in_features, weight_dtype, max_rank)
            for kind in kinds
        )
    )


def _describe(name: str, index: tuple[int, ...], numel: int, flat: int) -> str:
    where = f"{name}[{', '.join(map(str, index))}]"
    if flat == numel - 1:
        return f"{where} (the last element)"
    return where


@st.composite
def _planted(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    kind: str,
) -> AdversarialAdapter:
    value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
    rank = draw(_ranks(out_features, in_features, max_rank))
    lora_A, lora_B = _seeded_factors(draw, out_features, in_features, rank)
    name = draw(st.sampled_from(("lora_A", "lora_B")))
    target = lora_A if name == "lora_A" else lora_B
    numel = target.numel()
    position = draw(st.sampled_from(("last", "first", "anywhere")))
    flat = {"last": numel - 1, "first": 0}.get(position)
    if flat is None:
        flat = draw(st.integers(0, numel - 1))
    target.view(-1)[flat] = value
    index = unravel(flat, tuple(target.shape))
    # Any scale, zero and float32-subnormal products included: 0 * NaN and 0 * Inf are NaN.
    scale = draw(st.sampled_from((1.0, 0.5, -1.0, 2.0, 1e-3, 0.0, -0.0, 1e-38, 1e-30, 1e30)))
    detail = f"{kind} at {_describe(name, index, numel, flat)}"
    return AdversarialAdapter(safemerge.LoraAdapter(lora_A, lora_B), kind, scale, detail)


@st.composite
def _fp16_product_overflow(
    draw: st.DrawFn, out_features: int, in_features: int, weight_dtype: torch.dtype, max_rank: int
) -> AdversarialAdapter:
    rank = draw(st.integers(1, max_rank))
    stds = st.sampled_from((1.0, 0.0, 100.0))
    lora_A, lora_B = _seeded_factors(draw, out_features, in_features, rank, stds=stds)
    # Both factors representable in float16 (an adapter stored in float16 keeps them);
    # 256 * 256 = 65536 > 65504 already.
    big = st.floats(256, 2048).map(lambda v: _representable(v, torch.float16))
    sign = st.sampled_from((1.0, -1.0))
    a_value, b_value = draw(big) * draw(sign), draw(big) * draw(sign)
    i, k, j = (
        draw(st.integers(0, out_features - 1)),
        draw(st.integers(0, rank - 1)),
        draw(st.integers(0, in_features - 1)),
    )
    lora_A[k, j], lora_B[i, k] = a_value, b_value
    # A scale (a power of two) that keeps scale * |B @ A| within a quarter of the weight
    # dtype's max: the float32 merge into a zero weight fits, a float16 product does not.
    largest_delta = float((lora_B.double() @ lora_A.double()).abs().max())
    room = _dtype_max(weight_dtype) / 4
    scale = 1.0 if largest_delta <= room else 2.0 ** -math.ceil(math.log2(largest_delta / room))
    detail = f"B[{i}, {k}] * A[{k}, {j}] = {b_value:g} * {a_value:g} = {a_value * b_value:g}"
    return AdversarialAdapter(
        safemerge.LoraAdapter(lora_A, lora_B), "fp16-product-overflow", scale, detail
    )


@st.composite
def _subnormal(
    draw: st.DrawFn, out_features: int, in_features: int, weight_dtype: torch.dtype, max_rank: int
) -> AdversarialAdapter:
    rank = draw(st.integers(1, max_rank))
    mantissa = round(-math.log2(float(torch.finfo(weight_dtype).eps)))
    tiny = _smallest_subnormal(weight_dtype)
    generator = _generator(draw(_seeds))
    steps = torch.randint(-(2**mantissa - 1), 2**mantissa, (in_features,), generator=generator)
    i, k, j = (
        draw(st.integers(0, out_features - 1)),
        draw(st.integers(0, rank - 1)),
        draw(st.integers(0, in_features - 1)),
    )
    planted_steps = draw(st.integers(1, 2**mantissa - 1))
    steps[j] = planted_steps
    # n * tiny with |n| < 2**mantissa: exactly the subnormals of weight_dtype, all of
    # them exact in float32 (whose own subnormals reach 2**-149).
    lora_A = torch.zeros(rank, in_features)
    lora_A[k] = steps.to(torch.float64).mul(tiny).to(torch.float32)
    lora_B = torch.zeros(out_features, rank)
    lora_B[i, k] = draw(st.sampled_from((1.0, -1.0)))
    detail = (
        f"B[{i}, {k}] = {float(lora_B[i, k]):g}, A[{k}, :] subnormal in {weight_dtype} "
        f"(A[{k}, {j}] = {planted_steps} * {tiny:g})"
    )
    return AdversarialAdapter(safemerge.LoraAdapter(lora_A, lora_B), "subnormal", 1.0, detail)


@st.composite
def _cancellation(
    draw: st.DrawFn, out_features: int, in_features: int, weight_dtype: torch.dtype, max_rank: int
) -> AdversarialAdapter:
    half = draw(st.integers(1, max(1, max_rank // 2)))
    generator = _generator(draw(_seeds))
    a_half = torch.randint(-256, 257, (half, in_features), generator=generator).float()
    b_half = torch.randint(-256, 257, (out_features, half), generator=generator).float()
    big = st.integers(128, 256)
    a_half[0, 0], b_half[0, 0] = draw(big), draw(big)
    lora_A = torch.cat([a_half, -a_half])
    lora_B = torch.cat([b_half, b_half], dim=1)
    # Powers of two: scale * B is exact, so the cancellation survives any evaluation order.
    scale = draw(st.sampled_from((1.0, 2.0, -1.0, 0.5)))
    detail = (
        f"rank {2 * half}: A[{half}:] = -A[:{half}], B[:, {half}:] = B[:, :{half}], "
        f"largest product {float(b_half.abs().max() * a_half.abs().max()):g}"
    )
    return AdversarialAdapter(safemerge.LoraAdapter(lora_A, lora_B), "cancellation", scale, detail)


def _strided(values: torch.Tensor) -> torch.Tensor:
    """``values`` as every other element of a wider buffer: same values, stride 2 inside."""
    buffer = torch.zeros(*values.shape, 2, dtype=values.dtype)
    buffer[..., 0] = values
    return buffer[..., 0]


@st.composite
def _non_contiguous(
    draw: st.DrawFn, out_features: int, in_features: int, weight_dtype: torch.dtype, max_rank: int
) -> AdversarialAdapter:
    rank = draw(st.integers(2, max(2, max_rank)))
    a_values, b_values = _seeded_factors(draw, out_features, in_features, rank)
    layout = draw(st.sampled_from(("transposed", "strided")))
    if layout == "transposed" and in_features > 1:
        lora_A = a_values.t().contiguous().t()
    else:
        layout = "strided"
        lora_A = _strided(a_values)
    lora_B = _strided(b_values)
    scale = draw(st.sampled_from((1.0, 0.5, -1.0)))
    detail = f"lora_A {layout} (strides {lora_A.stride()}), lora_B strided ({lora_B.stride()})"
    return AdversarialAdapter(
        safemerge.LoraAdapter(lora_A, lora_B), "non-contiguous", scale, detail
    )


def _planted_builder(kind: str) -> Callable[..., SearchStrategy[AdversarialAdapter]]:
    return lambda out_f, in_f, dtype, max_rank: _planted(out_f, in_f, dtype, max_rank, kind)


_ADAPTER_BUILDERS: dict[str, Callable[..., SearchStrategy[AdversarialAdapter]]] = {
    "nan": _planted_builder("nan"),
    "+inf": _planted_builder("+inf"),
    "-inf": _planted_builder("-inf"),
    "fp16-product-overflow": _fp16_product_overflow,
    "subnormal": _subnormal,
    "cancellation": _cancellation,
    "non-contiguous": _non_contiguous,
}


# --- merge cases ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MergeCase:
    """A weight, an adapter for it, and a scale: one call ``fuse_weight(weight, adapter,
    scale=scale)``.

    Attributes:
        weight: ``(out, in)`` tensor of a supported dtype (fuse into a clone if you need
            the original).
        adapter: a ``safemerge.LoraAdapter`` with ``lora_A (r, in)``, ``lora_B (out, r)``.
        scale: the overall scale.
        kind: ``"random"`` or one of :data:`ADVERSARIAL_KINDS`.
        detail: what was planted where (empty for random cases).
    """

    weight: torch.Tensor
    adapter: safemerge.LoraAdapter
    scale: float
    kind: str
    detail: str = ""

    @property
    def must_refuse(self) -> bool:
        """Every correct implementation refuses this case (NaN, +-Inf, cast overflow).

        Other cases may be refused too (a random weight at its dtype's max plus a delta);
        they must then be refused for a non-finite result, as the contract says.
        """
        return self.kind in MUST_REFUSE_KINDS


def merge_cases(
    *,
    dtype: torch.dtype | None = None,
    kinds: Sequence[str] | None = None,
    min_side: int = 1,
    max_side: int = 16,
) -> SearchStrategy[MergeCase]:
    """Weights with an adapter and a scale: ordinary and adversarial, in equal shares of kind.

    Args:
        dtype: the weight dtype (see :func:`weights`); ``None`` draws one per case.
        kinds: which of :data:`MERGE_CASE_KINDS` to make; ``None``: all that apply to
            ``dtype`` (a float32 weight cannot overflow on the cast back, so
            ``"cast-overflow"`` needs a narrower dtype). ``("random",)`` gives ordinary
            cases only: :func:`weights`, :func:`lora_adapters` and :func:`scales`.
        min_side, max_side: the smallest and largest side of the weight (a large
            ``min_side`` finds guards that check in blocks and miss the last one).

    ``"cast-overflow"``: the float32 sum is finite but beyond the weight dtype's range at
    one drawn element: the weight holds a value near its dtype's max (half of it to all
    of it) and a rank-1 delta pushes the sum past ``overflow_threshold(dtype)``, so only
    the cast back overflows (to Inf, or for float8_e4m3fn, which has no Inf, silently
    saturating to 448).
    """
    if dtype is not None:
        _check_dtype("dtype", dtype, SUPPORTED_DTYPES)
    _check_int("min_side", min_side, low=1)
    _check_int("max_side", max_side, low=min_side)
    if kinds is None:
        kinds = tuple(
            k for k in MERGE_CASE_KINDS if not (dtype == torch.float32 and k == "cast-overflow")
        )
    else:
        kinds = _check_kinds("kinds", kinds, MERGE_CASE_KINDS)
        if dtype == torch.float32 and "cast-overflow" in kinds:
            raise InvalidArgument(
                f"kinds={kinds!r} with dtype={dtype!r}: a float32 weight cannot overflow on the "
                f"cast back; pass a narrower dtype (e.g. dtype=torch.float16) or drop "
                f"'cast-overflow'"
            )
    return st.one_of(*(_merge_cases(dtype, kind, min_side, max_side) for kind in kinds))


_NARROW_DTYPES = tuple(d for d in SUPPORTED_DTYPES if d != torch.float32)


@st.composite
def _merge_cases(
    draw: st.DrawFn, dtype: torch.dtype | None, kind: str, min_side: int, max_side: int
) -> MergeCase:
    if dtype is None:
        dtype = draw(
            st.sampled_from(_NARROW_DTYPES if kind == "cast-overflow" else SUPPORTED_DTYPES)
        )
    shape = (draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side)))
    if kind == "cast-overflow":
        return draw(_cast_overflow_cases(dtype, shape))
    weight = draw(weights(dtype=dtype, shape=shape))
    if kind == "random":
        adapter = draw(lora_adapters(out_features=shape[0], in_features=shape[1]))
        return MergeCase(weight, adapter, draw(scales()), "random")
    case = draw(
        adversarial_adapters(
            out_features=shape[0], in_features=shape[1], weight_dtype=dtype, kinds=(kind,)
        )
    )
    return MergeCase(weight, case.adapter, case.scale, kind, case.detail)


@st.composite
def _cast_overflow_cases(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, int]) -> MergeCase:
    out_features, in_features = shape
    generator = _generator(draw(_seeds))
    # A small bulk (|w| of a few units at most) so that only the planted element overflows.
    weight = _seeded_normal(shape, draw(st.sampled_from((1.0, 0.0, 0.02))), dtype, generator)
    largest = _dtype_max(dtype)
    threshold = overflow_threshold(dtype)
    ceiling = min(4 * threshold, F32_MAX)
    sign = draw(st.sampled_from((1.0, -1.0)))
    weight_value = _representable(draw(st.sampled_from((1.0, 0.75, 0.5))) * largest, dtype)
    # The float32 sum: beyond the threshold by at least 5% of the room up to the ceiling,
    # far more than the float32 rounding of delta (relative 2**-24) can move it.
    target = threshold + draw(st.sampled_from((0.5, 0.05, 0.25, 0.75, 0.95))) * (
        ceiling - threshold
    )
    delta = target - weight_value
    feasible = [s for s in (1.0, 0.5, 4.0, 1e30, 1e-3) if abs(delta / s) < F32_MAX * 0.99]
    scale = draw(st.sampled_from(feasible))
    rank = draw(st.integers(1, 3))
    i, k, j = (
        draw(st.integers(0, out_features - 1)),
        draw(st.integers(0, rank - 1)),
        draw(st.integers(0, in_features - 1)),
    )
    noise = draw(st.sampled_from((0.0, 1e-3)))
    lora_A = _seeded_normal((rank, in_features), noise, torch.float32, generator)
    lora_B = _seeded_normal((out_features, rank), noise, torch.float32, generator)
    lora_A[k], lora_B[:, k] = 0.0, 0.0  # only the planted pair uses column k of B
    lora_A[k, j] = sign * delta / scale
    lora_B[i, k] = 1.0
    weight[i, j] = sign * weight_value
    detail = (
        f"weight[{i}, {j}] = {sign * weight_value:g} plus {sign * delta:g} = "
        f"{sign * target:g}: finite in float32, beyond {dtype}'s threshold {threshold:g}"
    )
    adapter = safemerge.LoraAdapter(lora_A, lora_B)  # alpha = rank: adapter scale 1
    return MergeCase(weight, adapter, scale, "cast-overflow", detail)


# --- quantization configs ------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizationConfig:
    """bitsandbytes settings for a quantized layer.

    Attributes:
        quant_type: ``"nf4"`` or ``"fp4"`` (``Linear4bit``), or ``"int8"`` (``Linear8bitLt``).
        blocksize: 4-bit absmax block size (a power of two); None for int8 (row-wise).
        nested: 4-bit double quantization of the absmax (``compress_statistics``).
        threshold: int8 outlier threshold (``0.0`` disables outliers); None for 4-bit.
    """

    quant_type: str
    blocksize: int | None = None
    nested: bool = False
    threshold: float | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The settings as ``QuantizedFuseRecord.settings`` reports them."""
        if self.quant_type == "int8":
            return {"threshold": self.threshold}
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "nested": self.nested}


def quantization_configs(
    *,
    quant_types: Sequence[str] = QUANT_TYPES,
    min_blocksize: int = 32,
    max_blocksize: int = 4096,
) -> SearchStrategy[QuantizationConfig]:
    """:class:`QuantizationConfig` values: NF4/FP4 with a power-of-two blocksize in
    ``min_blocksize..max_blocksize`` (shrinking to 64) and nested or not; int8 with
    threshold 0.0 or 6.0 (bitsandbytes' default)."""
    quant_types = _check_kinds("quant_types", quant_types, QUANT_TYPES)
    for name, value in (("min_blocksize", min_blocksize), ("max_blocksize", max_blocksize)):
        _check_int(name, value, low=32, high=4096)
        if value & (value - 1):
            raise InvalidArgument(f"{name}={value!r} must be a power of two, e.g. {name}=64")
    if min_blocksize > max_blocksize:
        raise InvalidArgument(
            f"min_blocksize={min_blocksize!r} is above max_blocksize={max_blocksize!r}; swap them"
        )
    exponents = range(int(math.log2(min_blocksize)), int(math.log2(max_blocksize)) + 1)
    blocksizes = sorted((2**e for e in exponents), key=lambda b: (b != 64, b))
    parts = []
    four_bit = [q for q in quant_types if q != "int8"]
    if four_bit:
        parts.append(
            st.builds(
                QuantizationConfig,
                quant_type=st.sampled_from(four_bit),
                blocksize=st.sampled_from(blocksizes),
                nested=st.booleans(),
            )
        )
    if "int8" in quant_types:
        parts.append(
            st.builds(
                QuantizationConfig,
                quant_type=st.just("int8"),
                threshold=st.sampled_from((0.0, 6.0)),
            )
        )
    return st.one_of(*parts)
