"""The layer cases every correct implementation refuses: a NaN or an Inf planted in an
adapter, and a weight (or bias) pushed by the adapters beyond the range of the dtype it is
stored in."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from pytest_safemerge._strategies.layer_adapters import adapter_scale
from pytest_safemerge._strategies.layer_shapes import Built
from pytest_safemerge._strategies.values import F32_MAX, dtype_max, representable, seeded_normal
from safemerge.merge.numerics import FLOAT32_RANGE_LIMIT, overflow_threshold

#: Scales an overflow case draws from, when its planted values fit the adapters' dtypes.
_OVERFLOW_SCALES = (1.0, 0.5, 2.0, -1.0, 4.0, 1e-3, 1e30)
#: Otherwise (float16 adapters, whose largest value is 65504, pushing a bias past float16's
#: range, or a sum past float32's or bfloat16's).
_LARGE_OVERFLOW_SCALES = (16.0, 1e35)


@st.composite
def planted_non_finite(
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
def overflow(
    draw: st.DrawFn,
    built: Built,
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
    largest = dtype_max(storage)
    sign = draw(st.sampled_from((1.0, -1.0)))
    start = representable(draw(st.sampled_from((0.5, 0.75, 1.0))) * largest, storage)
    # bfloat16 has float32's range: beyond its threshold there is room for less than one
    # of its roundings near the max, so a sum merged in steps (each rounded, as PEFT does)
    # may come back in range. With several adapters the float32 sum overflows instead.
    in_steps = storage == torch.bfloat16 and len(adapters) > 1
    if math.isinf(threshold) or in_steps:  # the float32 sum itself overflows
        target = start + draw(st.sampled_from((0.75, 1.0))) * F32_MAX  # at least 1.25 x max
        beyond = f"beyond float32's range ({F32_MAX:g}): the float32 sum is Inf"
    else:
        ceiling = min(4 * threshold, F32_MAX)
        target = threshold + draw(st.sampled_from((0.05, 0.25, 0.5, 0.95))) * (ceiling - threshold)
        beyond = f"finite in float32, beyond {storage}'s threshold {threshold:g}"
    push = (target - start) / len(adapters)
    coefficients = [adapter_scale(parts) for parts in adapters]
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
                parts["lora_bias"] = seeded_normal(
                    (built.out_features,), 0.02, parts["lora_A"].dtype, generator
                )
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
        beyond = f"beyond float32's range ({F32_MAX:g}): the float32 sum is Inf"
    detail = (
        f"{where} = {sign * start:g} plus "
        + " + ".join(f"{one:g}" for one in pushes)
        + f" = {total:g}: {beyond}"
    )
    return scale, detail


def _weight_storage_dtype(built: Built) -> torch.dtype:
    """The dtype the merged weight is stored in, as far as its range goes."""
    if built.tag == "int8":
        return torch.float16  # Int8Params quantize through float16
    return built.dtype  # float32 for 4-bit layers: the absmax is float32


def _plant_delta(built: Built, parts: dict[str, Any], row: int, column: int, value: float) -> float:
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
