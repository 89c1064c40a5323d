"""The error bounds: right by construction, and tight enough to catch a wrong merge."""

from __future__ import annotations

import torch

from safemerge.merge import bounds
from safemerge.merge.numerics import U32


def test_gamma_is_higham_gamma() -> None:
    assert bounds.gamma(1) == U32 / (1 - U32)
    assert bounds.gamma(18) > 18 * U32


def test_roundings_count_rank_plus_two() -> None:
    assert bounds.roundings([16]) == 18
    assert bounds.roundings([3, 5]) == 10


def test_a_coefficient_below_float32_range_is_all_error() -> None:
    weight = torch.zeros(1, 1)
    left, right = torch.ones(1, 1), torch.ones(1, 1)
    bound = bounds.accumulation_bound(weight, [(left, right, 1e-50)])
    assert float(bound) >= 1e-50  # float32(1e-50) == 0: the whole term may be lost


def test_the_bound_is_tight_enough_to_catch_a_half_precision_merge() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator)
    left, right = torch.randn(64, 8, generator=generator), torch.randn(8, 64, generator=generator)
    reference, bound = bounds.merge_bound(weight, [(left, right, 0.5)], torch.float32)
    correct = (weight + 0.5 * left @ right).double()
    sloppy = (weight.half() + (0.5 * left.half() @ right.half())).double()
    assert bool(((correct - reference).abs() <= bound).all())
    assert not bool(((sloppy - reference).abs() <= bound).all())


def test_cast_bound_is_half_an_ulp_of_the_target() -> None:
    values = torch.tensor([1.0, 3.0, 1e-6], dtype=torch.float64)
    half_ulps = bounds.cast_bound(values, torch.bfloat16)
    assert half_ulps.tolist()[:2] == [2.0**-8, 2.0**-7]
    assert bool((bounds.cast_bound(values, torch.float32) == 0).all())
