"""Weights, scales and LoRA adapters: the ordinary material of a merge."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

import safemerge
from pytest_safemerge._strategies import validation
from pytest_safemerge._strategies.values import (
    ADAPTER_DTYPES,
    SEEDS,
    STDS,
    bit_width,
    dtype_max,
    finite_patterns,
    from_patterns,
    generator,
    largest_finite_magnitude_bits,
    seeded_factors,
    seeded_normal,
    special_values,
)
from safemerge.merge.numerics import SUPPORTED_DTYPES

ELEMENTS = ("normal", "bits")
#: Ordinary and extreme scales, in the order they shrink to: 1.0 first.
#: 1e-38 puts ``scale * B`` among float32's subnormals; 1e30 overflows most deltas.
ORDINARY_SCALES = (1.0, 0.5, 2.0, -1.0, 0.0, -0.0, 1 / 3, 1e-6, 1e6)
EXTREME_SCALES = (1e-30, -1e-30, 1e-38, -1e-38, 1e30, -1e30)
#: Up to this many elements, "bits" weights draw every pattern through Hypothesis.
_DIRECT_BITS = 64


# --- weights --------------------------------------------------------------------------------


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
        validation.check_dtype("dtype", dtype, SUPPORTED_DTYPES)
    if shape is not None and (
        not isinstance(shape, tuple)
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise InvalidArgument(
            f"shape={shape!r} must be a tuple of two positive ints (out, in), "
            f"e.g. shape=(4, 8), or None to draw sides up to max_side"
        )
    validation.check_int("max_side", max_side, low=1)
    validation.check_choice("elements", elements, ELEMENTS)
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
                [draw(finite_patterns(dtype)) for _ in range(numel)], dtype=torch.int64
            )
        else:
            # Larger ones: seeded random patterns (fast), a few overwritten by Hypothesis.
            width = bit_width(dtype)
            rng = generator(draw(SEEDS))
            largest = largest_finite_magnitude_bits(dtype)
            magnitude = torch.randint(0, largest + 1, (numel,), generator=rng)
            negative = torch.randint(0, 2, (numel,), generator=rng)
            patterns = magnitude - negative * (1 << (width - 1))
            for index, pattern in draw(
                st.lists(st.tuples(positions, finite_patterns(dtype)), max_size=8)
            ):
                patterns[index] = pattern
        return from_patterns(patterns, dtype).reshape(shape)
    std = draw(st.sampled_from(STDS))
    weight = seeded_normal(shape, std, dtype, generator(draw(SEEDS)))
    largest_value = dtype_max(dtype)
    values = st.one_of(
        st.sampled_from(special_values(dtype)),
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
    validation.check_int("out_features", out_features, low=1)
    validation.check_int("in_features", in_features, low=1)
    validation.check_int("max_rank", max_rank, low=1)
    if rank is not None:
        validation.check_int("rank", rank, low=1)
    validation.check_dtype("dtype", dtype, ADAPTER_DTYPES)
    validation.check_alpha(alpha)
    validation.check_bool_or_none("rslora", rslora)
    return _lora_adapters(out_features, in_features, rank, max_rank, dtype, alpha, rslora)


def merge_adapters(
    out_features: int, in_features: int, dtype: torch.dtype
) -> SearchStrategy[safemerge.LoraAdapter]:
    """The adapters of ``merge_cases``' random cases: :func:`lora_adapters`, but factors of a
    float16 or bfloat16 ``dtype`` are never all zero (float32 ones cover that), so that
    almost every such case has a product whose rounding in that dtype shows."""
    stds = st.sampled_from(STDS if dtype == torch.float32 else tuple(s for s in STDS if s))
    return _lora_adapters(out_features, in_features, None, 8, dtype, None, None, stds)


def ranks(out_features: int, in_features: int, max_rank: int) -> SearchStrategy[int]:
    """Ranks in ``1..max_rank``, favouring those above ``min(out, in)`` when allowed."""
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
    stds: SearchStrategy[float] | None = None,
) -> safemerge.LoraAdapter:
    if rank is None:
        rank = draw(ranks(out_features, in_features, max_rank))
    if alpha is None:
        alpha = draw(
            st.one_of(st.none(), st.sampled_from((8.0, 16.0, 1.0, 32.0)), st.floats(-64, 64))
        )
    elif isinstance(alpha, SearchStrategy):
        alpha = draw(alpha)
    if rslora is None:
        rslora = draw(st.booleans())
    lora_A, lora_B = seeded_factors(draw, out_features, in_features, rank, dtype, stds)
    return safemerge.LoraAdapter(lora_A, lora_B, alpha=alpha, use_rslora=rslora)
