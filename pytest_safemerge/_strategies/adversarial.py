"""Adversarial adapters: each built to break careless merge code in one particular way."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

import safemerge
from pytest_safemerge._strategies import validation
from pytest_safemerge._strategies.kinds import ADAPTER_KINDS, MUST_REFUSE_KINDS
from pytest_safemerge._strategies.tensors import ranks
from pytest_safemerge._strategies.values import (
    ADAPTER_DTYPES,
    SEEDS,
    dtype_max,
    generator,
    planted_position,
    representable,
    seeded_factors,
    smallest_subnormal,
)
from safemerge.merge.numerics import SUPPORTED_DTYPES, unravel


@dataclass(frozen=True, eq=False)
class AdversarialAdapter:
    """An adapter built to break merge code in one particular way.

    Attributes:
        adapter: the ``safemerge.LoraAdapter`` (factors of the adapter dtype asked for or
            drawn, float32 by default; alpha = rank: adapter scale 1).
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


def subnormal_quantum(weight_dtype: torch.dtype, adapter_dtype: torch.dtype) -> float | None:
    """The spacing of the values that are subnormals of ``weight_dtype`` and exact in
    ``adapter_dtype`` (every multiple of it below the weight dtype's smallest normal is
    both), or None where ``adapter_dtype`` holds none of them (a float16 adapter cannot
    hold a float32 or bfloat16 subnormal)."""
    normal = float(torch.finfo(weight_dtype).smallest_normal)
    # The adapter's spacing below `normal` is at most its spacing in the binade just
    # below it, or its subnormals' spacing: a power of two, as the weight's subnormals' is.
    quantum = max(
        smallest_subnormal(weight_dtype),
        smallest_subnormal(adapter_dtype),
        normal / 2 * float(torch.finfo(adapter_dtype).eps),
    )
    return quantum if quantum <= normal / 2 else None


def subnormal_adapter_dtypes(weight_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The adapter dtypes a "subnormal" case for ``weight_dtype`` can use."""
    return tuple(d for d in ADAPTER_DTYPES if subnormal_quantum(weight_dtype, d) is not None)


def adversarial_adapters(
    *,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype = torch.bfloat16,
    kinds: Sequence[str] = ADAPTER_KINDS,
    max_rank: int = 4,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> SearchStrategy[AdversarialAdapter]:
    """Adapters for a ``(out_features, in_features)`` weight of ``weight_dtype`` that break
    careless merge code; each comes labelled with its kind (see :class:`AdversarialAdapter`).

    Kinds:
        ``"nan"``, ``"+inf"``, ``"-inf"``: that value planted in ``lora_A`` or ``lora_B``
        at a drawn position, the last element included (it shrinks to the last).
        ``"fp16-product-overflow"``: single products ``|B[i,k] * A[k,j]|`` above 65504
        (float16's max), all finite in float32, of factors exact in float16: a merge
        computed in float16 sees Inf.
        ``"subnormal"``: ``B @ A`` is exactly a row of ``weight_dtype`` subnormals (B is
        one-hot): a merge that flushes subnormals to zero loses it.
        ``"cancellation"``: the second half of the rank repeats the first with A
        negated, integer values up to 256 (products up to 2**16): ``B @ A`` is exactly 0,
        and float32 sums it exactly in any order (every partial sum is an integer
        below 2**24).
        ``"non-contiguous"``: ``lora_A`` and ``lora_B`` are strided or transposed views
        (rank at least 2, so they are never contiguous).

    Args:
        adapter_dtype: the factors' dtype (float32, float16 or bfloat16; every planted
            value is exact in it); ``None`` draws one per adapter. A "subnormal" case
            needs a dtype that holds the weight dtype's subnormals: float16 holds no
            float32 or bfloat16 subnormal (with ``None`` it is not drawn for them).

    ``"cast-overflow"`` and ``"delta-overflow"`` depend on the weight: :func:`merge_cases`
    makes them.
    """
    validation.check_int("out_features", out_features, low=1)
    validation.check_int("in_features", in_features, low=1)
    validation.check_dtype("weight_dtype", weight_dtype, SUPPORTED_DTYPES)
    hint = (
        ' ("cast-overflow" and "delta-overflow" need the weight: use '
        'merge_cases(kinds=("cast-overflow",)))'
    )
    kinds = validation.check_kinds("kinds", kinds, ADAPTER_KINDS, hint)
    validation.check_int("max_rank", max_rank, low=1, high=64)
    if adapter_dtype is not None:
        validation.check_dtype("adapter_dtype", adapter_dtype, ADAPTER_DTYPES)
        if "subnormal" in kinds and subnormal_quantum(weight_dtype, adapter_dtype) is None:
            raise InvalidArgument(
                f"kinds={kinds!r} with adapter_dtype={adapter_dtype!r}: a {adapter_dtype} "
                f"adapter holds no subnormal of weight_dtype={weight_dtype!r}; pass "
                f"adapter_dtype=torch.float32 or drop 'subnormal'"
            )
    return st.one_of(
        *(
            adapter_strategy(kind, out_features, in_features, weight_dtype, max_rank, adapter_dtype)
            for kind in kinds
        )
    )


def adapter_strategy(
    kind: str,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    adapter_dtype: torch.dtype | None,
) -> SearchStrategy[AdversarialAdapter]:
    """One kind's adversarial adapters (arguments already checked)."""
    if adapter_dtype is None:
        choices = subnormal_adapter_dtypes(weight_dtype) if kind == "subnormal" else ADAPTER_DTYPES
        dtypes = st.sampled_from(choices)
    else:
        dtypes = st.just(adapter_dtype)
    build = _BUILDERS[kind]
    return dtypes.flatmap(
        lambda dtype: build(out_features, in_features, weight_dtype, max_rank, dtype)
    )


def _describe(name: str, index: tuple[int, ...], numel: int, flat: int) -> str:
    where = f"{name}[{', '.join(map(str, index))}]"
    if flat == numel - 1:
        return f"{where} (the last element)"
    return where


def _dtype_note(adapter_dtype: torch.dtype) -> str:
    return "" if adapter_dtype == torch.float32 else f" ({adapter_dtype} adapter)"


@st.composite
def _planted(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    adapter_dtype: torch.dtype,
    kind: str,
) -> AdversarialAdapter:
    value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
    rank = draw(ranks(out_features, in_features, max_rank))
    lora_A, lora_B = seeded_factors(draw, out_features, in_features, rank, adapter_dtype)
    name = draw(st.sampled_from(("lora_A", "lora_B")))
    target = lora_A if name == "lora_A" else lora_B
    numel = target.numel()
    position = draw(st.sampled_from(("last", "first", "anywhere")))
    flat = {"last": numel - 1, "first": 0}.get(position)
    if flat is None:
        flat = draw(st.integers(0, numel - 1))
    target.view(-1)[flat] = value  # NaN and +-Inf exist in every adapter dtype
    index = unravel(flat, tuple(target.shape))
    # Any scale, zero and float32-subnormal products included: 0 * NaN and 0 * Inf are NaN.
    scale = draw(st.sampled_from((1.0, 0.5, -1.0, 2.0, 1e-3, 0.0, -0.0, 1e-38, 1e-30, 1e30)))
    detail = f"{kind} at {_describe(name, index, numel, flat)}{_dtype_note(adapter_dtype)}"
    return AdversarialAdapter(safemerge.LoraAdapter(lora_A, lora_B), kind, scale, detail)


@st.composite
def _fp16_product_overflow(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    adapter_dtype: torch.dtype,
) -> AdversarialAdapter:
    rank = draw(st.integers(1, max_rank))
    stds = st.sampled_from((1.0, 0.0, 100.0))
    lora_A, lora_B = seeded_factors(draw, out_features, in_features, rank, adapter_dtype, stds)
    # Both factors exact in float16 (an adapter stored in float16 keeps them) and in the
    # adapter's dtype (bfloat16 keeps 256..2048 in that range); 256 * 256 = 65536 > 65504.
    big = st.floats(256, 2048).map(
        lambda v: representable(representable(v, torch.float16), adapter_dtype)
    )
    sign = st.sampled_from((1.0, -1.0))
    a_value, b_value = draw(big) * draw(sign), draw(big) * draw(sign)
    i, k, j = planted_position(draw, (out_features, in_features), rank)
    lora_A[k, j], lora_B[i, k] = a_value, b_value
    # A scale (a power of two) that keeps scale * |B @ A| within a quarter of the weight
    # dtype's max: the float32 merge into a zero weight fits, a float16 product does not.
    largest_delta = float((lora_B.double() @ lora_A.double()).abs().max())
    room = dtype_max(weight_dtype) / 4
    scale = 1.0 if largest_delta <= room else 2.0 ** -math.ceil(math.log2(largest_delta / room))
    detail = (
        f"B[{i}, {k}] * A[{k}, {j}] = {b_value:g} * {a_value:g} = {a_value * b_value:g}"
        f"{_dtype_note(adapter_dtype)}"
    )
    return AdversarialAdapter(
        safemerge.LoraAdapter(lora_A, lora_B), "fp16-product-overflow", scale, detail
    )


@st.composite
def _subnormal(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    adapter_dtype: torch.dtype,
) -> AdversarialAdapter:
    quantum = subnormal_quantum(weight_dtype, adapter_dtype)
    assert quantum is not None, "checked by adversarial_adapters and merge_cases"
    # For a float32 adapter the quantum is weight_dtype's smallest subnormal.
    count = round(float(torch.finfo(weight_dtype).smallest_normal) / quantum)
    rank = draw(st.integers(1, max_rank))
    rng = generator(draw(SEEDS))
    steps = torch.randint(-(count - 1), count, (in_features,), generator=rng)
    i, k, j = planted_position(draw, (out_features, in_features), rank)
    planted_steps = draw(st.integers(1, count - 1))
    steps[j] = planted_steps
    # n * quantum with |n| < count: subnormals of weight_dtype, all exact in the adapter's
    # dtype and in float32 (whose own subnormals reach 2**-149).
    lora_A = torch.zeros(rank, in_features, dtype=adapter_dtype)
    lora_A[k] = steps.to(torch.float64).mul(quantum).to(torch.float32).to(adapter_dtype)
    lora_B = torch.zeros(out_features, rank, dtype=adapter_dtype)
    lora_B[i, k] = draw(st.sampled_from((1.0, -1.0)))
    detail = (
        f"B[{i}, {k}] = {float(lora_B[i, k]):g}, A[{k}, :] subnormal in {weight_dtype} "
        f"(A[{k}, {j}] = {planted_steps} * {quantum:g}){_dtype_note(adapter_dtype)}"
    )
    return AdversarialAdapter(safemerge.LoraAdapter(lora_A, lora_B), "subnormal", 1.0, detail)


@st.composite
def _cancellation(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    adapter_dtype: torch.dtype,
) -> AdversarialAdapter:
    half = draw(st.integers(1, max(1, max_rank // 2)))
    rng = generator(draw(SEEDS))
    a_half = torch.randint(-256, 257, (half, in_features), generator=rng).float()
    b_half = torch.randint(-256, 257, (out_features, half), generator=rng).float()
    big = st.integers(128, 256)
    a_half[0, 0], b_half[0, 0] = draw(big), draw(big)
    # Integers up to 256 are exact in float16 and bfloat16 too.
    lora_A = torch.cat([a_half, -a_half]).to(adapter_dtype)
    lora_B = torch.cat([b_half, b_half], dim=1).to(adapter_dtype)
    # Powers of two: scale * B is exact, so the cancellation survives any evaluation order.
    scale = draw(st.sampled_from((1.0, 2.0, -1.0, 0.5)))
    detail = (
        f"rank {2 * half}: A[{half}:] = -A[:{half}], B[:, {half}:] = B[:, :{half}], "
        f"largest product {float(b_half.abs().max() * a_half.abs().max()):g}"
        f"{_dtype_note(adapter_dtype)}"
    )
    return AdversarialAdapter(safemerge.LoraAdapter(lora_A, lora_B), "cancellation", scale, detail)


def _strided(values: torch.Tensor) -> torch.Tensor:
    """``values`` as every other element of a wider buffer: same values, stride 2 inside."""
    buffer = torch.zeros(*values.shape, 2, dtype=values.dtype)
    buffer[..., 0] = values
    return buffer[..., 0]


@st.composite
def _non_contiguous(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    max_rank: int,
    adapter_dtype: torch.dtype,
) -> AdversarialAdapter:
    rank = draw(st.integers(2, max(2, max_rank)))
    a_values, b_values = seeded_factors(draw, out_features, in_features, rank, adapter_dtype)
    layout = draw(st.sampled_from(("transposed", "strided")))
    if layout == "transposed" and in_features > 1:
        lora_A = a_values.t().contiguous().t()
    else:
        layout = "strided"
        lora_A = _strided(a_values)
    lora_B = _strided(b_values)
    scale = draw(st.sampled_from((1.0, 0.5, -1.0)))
    detail = (
        f"lora_A {layout} (strides {lora_A.stride()}), lora_B strided ({lora_B.stride()})"
        f"{_dtype_note(adapter_dtype)}"
    )
    return AdversarialAdapter(
        safemerge.LoraAdapter(lora_A, lora_B), "non-contiguous", scale, detail
    )


def _planted_builder(kind: str) -> Callable[..., SearchStrategy[AdversarialAdapter]]:
    return lambda out_f, in_f, dtype, max_rank, adapter_dtype: _planted(
        out_f, in_f, dtype, max_rank, adapter_dtype, kind
    )


_BUILDERS: dict[str, Callable[..., SearchStrategy[AdversarialAdapter]]] = {
    "nan": _planted_builder("nan"),
    "+inf": _planted_builder("+inf"),
    "-inf": _planted_builder("-inf"),
    "fp16-product-overflow": _fp16_product_overflow,
    "subnormal": _subnormal,
    "cancellation": _cancellation,
    "non-contiguous": _non_contiguous,
}
