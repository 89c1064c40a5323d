"""Merge cases: a weight, an adapter for it and a scale, ordinary or adversarial, and the
two kinds planted in weight and adapter together (cast and delta overflow)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

import safemerge
from pytest_safemerge._strategies import validation
from pytest_safemerge._strategies.adversarial import adapter_strategy, subnormal_quantum
from pytest_safemerge._strategies.kinds import MERGE_CASE_KINDS, MUST_REFUSE_KINDS, WEIGHT_KINDS
from pytest_safemerge._strategies.tensors import merge_adapters, scales, weights
from pytest_safemerge._strategies.values import (
    ADAPTER_DTYPES,
    F32_MAX,
    NARROW_DTYPES,
    SEEDS,
    dtype_max,
    generator,
    past_threshold,
    plant_product,
    planted_position,
    representable,
    seeded_normal,
)
from safemerge.merge.numerics import SUPPORTED_DTYPES, overflow_threshold


@dataclass(frozen=True, eq=False)
class MergeCase:
    """A weight, an adapter for it, and a scale: one call ``fuse_weight(weight, adapter,
    scale=scale)``.

    Attributes:
        weight: ``(out, in)`` tensor of a supported dtype (fuse into a clone if you need
            the original).
        adapter: a ``safemerge.LoraAdapter`` with ``lora_A (r, in)``, ``lora_B (out, r)``
            (float32, float16 or bfloat16 factors).
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
        they must then be refused for a non-finite result, as the contract says. A
        ``"delta-overflow"`` case never may: its result is well inside the dtype's range.
        """
        return self.kind in MUST_REFUSE_KINDS


def _weight_dtypes(kind: str, adapter_dtype: torch.dtype | None) -> tuple[torch.dtype, ...]:
    """The weight dtypes a case of ``kind`` can have (with this adapter dtype, if fixed)."""
    if kind in WEIGHT_KINDS:
        return NARROW_DTYPES
    if kind == "subnormal" and adapter_dtype is not None:
        return tuple(d for d in SUPPORTED_DTYPES if subnormal_quantum(d, adapter_dtype) is not None)
    return SUPPORTED_DTYPES


def kinds_for_dtype(
    dtype: torch.dtype | None, *, adapter_dtype: torch.dtype | None = None
) -> tuple[str, ...]:
    """The kinds of :data:`MERGE_CASE_KINDS` that :func:`merge_cases` can make for a weight
    of ``dtype`` (``None``: of any supported dtype), in their order there.

    ``"cast-overflow"`` and ``"delta-overflow"`` need a dtype whose range is narrower than
    float32's: neither applies to float32. With a fixed float16 ``adapter_dtype``,
    ``"subnormal"`` does not apply to float32 or bfloat16 weights (float16 holds none of
    their subnormals).
    """
    if dtype is not None:
        validation.check_dtype("dtype", dtype, SUPPORTED_DTYPES)
    if adapter_dtype is not None:
        validation.check_dtype("adapter_dtype", adapter_dtype, ADAPTER_DTYPES)
    if dtype is None:
        return MERGE_CASE_KINDS
    return tuple(k for k in MERGE_CASE_KINDS if dtype in _weight_dtypes(k, adapter_dtype))


def merge_cases(
    *,
    dtype: torch.dtype | None = None,
    kinds: Sequence[str] | None = None,
    min_side: int = 1,
    max_side: int = 16,
    adapter_dtype: torch.dtype | None = None,
) -> SearchStrategy[MergeCase]:
    """Weights with an adapter and a scale: ordinary and adversarial, in equal shares of kind.

    Args:
        dtype: the weight dtype (see :func:`weights`); ``None`` draws one per case, among
            those the case's kind applies to.
        kinds: which of :data:`MERGE_CASE_KINDS` to make; ``None``: all that apply to
            ``dtype`` (:func:`kinds_for_dtype`). ``("random",)`` gives ordinary cases
            only: :func:`weights`, :func:`lora_adapters` (float16 and bfloat16 factors never
            all zero) and :func:`scales`.
        min_side, max_side: the smallest and largest side of the weight (a large
            ``min_side`` finds guards that check in blocks and miss the last one).
        adapter_dtype: the dtype of ``lora_A`` and ``lora_B`` (float32, float16 or
            bfloat16; every value is exact in it); ``None`` draws one per case. It applies
            to every kind but ``"cast-overflow"`` and ``"delta-overflow"``, whose planted
            delta needs float32's range: their factors are float32. The exact result is
            that of the values as given, so a merge that computes ``B @ A`` in a float16 or
            bfloat16 adapter's dtype is off by that dtype's rounding of the product, far
            beyond a float32 merge's bound on a float32 weight.

    ``"cast-overflow"``: the float32 sum is finite but beyond the weight dtype's range at
    one drawn element: the weight holds a value near its dtype's max (half of it to all
    of it) and a rank-1 delta pushes the sum past ``overflow_threshold(dtype)``, so only
    the cast back overflows (to Inf, or for float8_e4m3fn, which has no Inf, silently
    saturating to 448). Every correct implementation refuses it.

    ``"delta-overflow"``: the mirror image, which every correct implementation accepts:
    at one drawn element the weight holds a value near its dtype's most negative one
    (three quarters of the max to all of it, either sign), and the float32 delta there
    is beyond the dtype's range on its own (past ``overflow_threshold(dtype)``, e.g.
    float16: -65504 + 70000), while the sum is at most half the dtype's max: a merge that
    casts or checks the delta in the weight's dtype, instead of the sum, refuses it. Both
    values are exact in float32 and the scale is a power of two, so a float32 merge
    computes the delta exactly and rounds the sum once, far inside the range.
    """
    if dtype is not None:
        validation.check_dtype("dtype", dtype, SUPPORTED_DTYPES)
    if adapter_dtype is not None:
        validation.check_dtype("adapter_dtype", adapter_dtype, ADAPTER_DTYPES)
    validation.check_int("min_side", min_side, low=1)
    validation.check_int("max_side", max_side, low=min_side)
    applicable = kinds_for_dtype(dtype, adapter_dtype=adapter_dtype)
    if kinds is None:
        kinds = applicable
    else:
        kinds = validation.check_kinds("kinds", kinds, MERGE_CASE_KINDS)
        misfits = [kind for kind in kinds if kind not in applicable]
        if misfits:
            raise InvalidArgument(
                f"kinds={kinds!r} with dtype={dtype!r}, adapter_dtype={adapter_dtype!r}: "
                f"{misfits} cannot be made for such a weight ({_why_not(misfits, dtype)}); "
                f"drop them, or pass a dtype they apply to (kinds_for_dtype(dtype) lists "
                f"the kinds that apply)"
            )
    return st.one_of(
        *(_merge_cases(dtype, kind, min_side, max_side, adapter_dtype) for kind in kinds)
    )


def _why_not(misfits: Sequence[str], dtype: torch.dtype | None) -> str:
    if any(kind in WEIGHT_KINDS for kind in misfits):
        return f"a {dtype} weight's range is not narrower than float32's"
    return "the adapter dtype holds none of the weight dtype's subnormals"


@st.composite
def _merge_cases(
    draw: st.DrawFn,
    dtype: torch.dtype | None,
    kind: str,
    min_side: int,
    max_side: int,
    adapter_dtype: torch.dtype | None,
) -> MergeCase:
    if dtype is None:
        dtype = draw(st.sampled_from(_weight_dtypes(kind, adapter_dtype)))
    shape = (draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side)))
    if kind == "cast-overflow":
        return draw(_cast_overflow_cases(dtype, shape))
    if kind == "delta-overflow":
        return draw(_delta_overflow_cases(dtype, shape))
    weight = draw(weights(dtype=dtype, shape=shape))
    if kind == "random":
        factors = adapter_dtype or draw(st.sampled_from(ADAPTER_DTYPES))
        adapter = draw(merge_adapters(shape[0], shape[1], factors))
        return MergeCase(weight, adapter, draw(scales()), "random")
    case = draw(adapter_strategy(kind, shape[0], shape[1], dtype, 4, adapter_dtype))
    return MergeCase(weight, case.adapter, case.scale, kind, case.detail)


def _quiet_factors(
    draw: st.DrawFn, shape: tuple[int, int], rank: int, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 factors with no noise or a little (std 1e-3), for a planted component."""
    noise = draw(st.sampled_from((0.0, 1e-3)))
    lora_A = seeded_normal((rank, shape[1]), noise, torch.float32, rng)
    lora_B = seeded_normal((shape[0], rank), noise, torch.float32, rng)
    return lora_A, lora_B


@st.composite
def _cast_overflow_cases(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, int]) -> MergeCase:
    rng = generator(draw(SEEDS))
    # A small bulk (|w| of a few units at most) so that only the planted element overflows.
    weight = seeded_normal(shape, draw(st.sampled_from((1.0, 0.0, 0.02))), dtype, rng)
    largest = dtype_max(dtype)
    threshold = overflow_threshold(dtype)
    sign = draw(st.sampled_from((1.0, -1.0)))
    weight_value = representable(draw(st.sampled_from((1.0, 0.75, 0.5))) * largest, dtype)
    # The float32 sum: beyond the threshold by at least 5% of the room up to the ceiling,
    # far more than the float32 rounding of delta (relative 2**-24) can move it.
    fraction = draw(st.sampled_from((0.5, 0.05, 0.25, 0.75, 0.95)))
    target = past_threshold(dtype, fraction, min(4 * threshold, F32_MAX))
    delta = target - weight_value
    feasible = [s for s in (1.0, 0.5, 4.0, 1e30, 1e-3) if abs(delta / s) < F32_MAX * 0.99]
    scale = draw(st.sampled_from(feasible))
    rank = draw(st.integers(1, 3))
    position = planted_position(draw, shape, rank)
    lora_A, lora_B = _quiet_factors(draw, shape, rank, rng)
    plant_product(lora_A, lora_B, position, sign * delta / scale)
    i, _, j = position
    weight[i, j] = sign * weight_value
    detail = (
        f"weight[{i}, {j}] = {sign * weight_value:g} plus {sign * delta:g} = "
        f"{sign * target:g}: finite in float32, beyond {dtype}'s threshold {threshold:g}"
    )
    adapter = safemerge.LoraAdapter(lora_A, lora_B)  # alpha = rank: adapter scale 1
    return MergeCase(weight, adapter, scale, "cast-overflow", detail)


@st.composite
def _delta_overflow_cases(draw: st.DrawFn, dtype: torch.dtype, shape: tuple[int, int]) -> MergeCase:
    rng = generator(draw(SEEDS))
    weight = seeded_normal(shape, draw(st.sampled_from((1.0, 0.0, 0.02))), dtype, rng)
    largest = dtype_max(dtype)
    threshold = overflow_threshold(dtype)
    sign = draw(st.sampled_from((1.0, -1.0)))
    held = representable(draw(st.sampled_from((1.0, 0.875, 0.75))) * largest, dtype)
    # |delta| past the threshold (by at least 5% of the room to the ceiling), and at most
    # held + max / 2, so that |sum| = |delta| - held is at most half the max; both exact
    # in float32, so their float32 sum is exact to 2**-24 relative, far inside the range.
    ceiling = min(held + largest / 2, F32_MAX)
    fraction = draw(st.sampled_from((0.5, 0.05, 0.25, 0.75, 0.95)))
    delta = past_threshold(dtype, fraction, ceiling)
    result = delta - held
    # Powers of two: delta / scale is exact in float32, and so is scale * (B @ A).
    scale = draw(st.sampled_from([s for s in (1.0, 0.5, 2.0, 4.0) if delta / s <= F32_MAX]))
    rank = draw(st.integers(1, 3))
    position = planted_position(draw, shape, rank)
    lora_A, lora_B = _quiet_factors(draw, shape, rank, rng)
    plant_product(lora_A, lora_B, position, sign * delta / scale)
    i, _, j = position
    weight[i, j] = -sign * held
    detail = (
        f"weight[{i}, {j}] = {-sign * held:g} plus {sign * delta:g} = {sign * result:g}: the "
        f"delta alone is beyond {dtype}'s threshold {threshold:g}, the sum well inside"
    )
    adapter = safemerge.LoraAdapter(lora_A, lora_B)  # alpha = rank: adapter scale 1
    return MergeCase(weight, adapter, scale, "delta-overflow", detail)
