"""The dtype facts the guard and the bounds stand on, checked against torch's own casts."""

from __future__ import annotations

import math

import pytest
import torch

from safemerge.merge import numerics

DTYPES = numerics.SUPPORTED_DTYPES


def _float32_neighbourhood(center: float, steps: int = 64) -> torch.Tensor:
    """``center`` and the ``steps`` float32 values on each side of it."""
    values = [torch.tensor(center, dtype=torch.float32)]
    up = down = values[0]
    for _ in range(steps):
        up = torch.nextafter(up, torch.tensor(math.inf))
        down = torch.nextafter(down, torch.tensor(-math.inf))
        values += [up, down]
    return torch.stack(values)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_overflow_threshold_is_exactly_where_the_cast_leaves_the_range(dtype: torch.dtype) -> None:
    threshold = numerics.overflow_threshold(dtype)
    largest = float(torch.finfo(dtype).max)
    values = torch.cat([_float32_neighbourhood(threshold), _float32_neighbourhood(largest)])
    values = torch.cat([values, -values])
    cast = values.to(dtype).to(torch.float32)
    # In range: the cast is finite and rounds to within half an ulp (not saturated).
    half_ulp_at_max = (numerics.ulp(torch.tensor(largest), dtype) / 2).item()
    in_range = torch.isfinite(cast) & ((cast.double() - values.double()).abs() <= half_ulp_at_max)
    assert torch.equal(in_range, values.abs() < threshold)


def test_float32_threshold_is_infinity() -> None:
    assert numerics.overflow_threshold(torch.float32) == math.inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_is_the_gap_to_the_next_representable_value(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    samples = torch.tensor([info.tiny, info.tiny * 3, 1.0, 1.5, 3.0, float(info.max) / 2])
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        samples = torch.cat([samples, torch.tensor([info.tiny / 4])])  # a subnormal
    values = samples.to(dtype)
    gaps = ulp(values, dtype)
    bits = numerics.int_view(values)
    next_values = (bits + 1).view(dtype).to(torch.float64)
    assert torch.equal(next_values - values.to(torch.float64), gaps)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return numerics.ulp(values.to(torch.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ordered_bits_count_ulps_and_invert_exactly(dtype: torch.dtype) -> None:
    width = torch.empty((), dtype=dtype).element_size()
    if width == 1:
        patterns = torch.arange(-128, 128, dtype=torch.int8)
    else:
        generator = torch.Generator().manual_seed(0)
        low, high = -(2 ** (8 * width - 1)), 2 ** (8 * width - 1)
        patterns = torch.randint(low, high, (4096,), generator=generator)
        patterns = patterns.to(numerics.int_view(torch.empty(0, dtype=dtype)).dtype)
    values = patterns.view(dtype)
    ordered = numerics.ordered_bits(values)
    restored = numerics.from_ordered_bits(ordered, dtype)
    assert torch.equal(numerics.int_view(restored), patterns)
    finite = values.to(torch.float32)
    finite_mask = torch.isfinite(finite)
    order = torch.argsort(ordered[finite_mask])
    assert bool((finite[finite_mask][order].diff() >= 0).all())


def test_zero_signs_are_distinct_neighbours() -> None:
    zeros = torch.tensor([0.0, -0.0], dtype=torch.bfloat16)
    assert numerics.ordered_bits(zeros).tolist() == [0, -1]


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(TypeError, match="float64"):
        numerics.check_supported(torch.float64)
