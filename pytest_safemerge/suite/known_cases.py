"""Hand-written cases that real merge code has got wrong, run first by every property.

Generated cases find most bugs; these pin the ones that hide in a corner a random draw
rarely visits: a result exactly at the dtype's largest value, a sum just past its
overflow threshold, a delta past it with the sum well inside, a NaN behind a zero scale
or a zero ``lora_B``, a subnormal result on a zero weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import safemerge
from pytest_safemerge.strategies import F32_MAX, MergeCase, representable

_NARROW = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def _case(
    weight: list[list[float]],
    dtype: torch.dtype,
    lora_A: list[list[float]],
    lora_B: list[list[float]],
    scale: float,
    kind: str,
    detail: str,
) -> MergeCase:
    adapter = safemerge.LoraAdapter(torch.tensor(lora_A), torch.tensor(lora_B))
    return MergeCase(torch.tensor(weight).to(dtype), adapter, scale, kind, detail)


def _at_the_limit() -> list[MergeCase]:
    # ``W + 0`` where W holds the dtype's largest values: finite, and must be accepted
    # (a guard written ``>= finfo.max`` refuses it).
    cases = []
    for dtype in _NARROW:
        largest = float(torch.finfo(dtype).max)
        cases.append(
            _case(
                [[largest, -largest]],
                dtype,
                [[0.0, 0.0]],
                [[1.0]],
                1.0,
                "random",
                f"the result is exactly +-{largest:g}, {dtype}'s largest value",
            )
        )
    return cases


def _delta_rounding_beyond_the_bound() -> list[MergeCase]:
    # A delta 16 times the weight, whose own rounding to bfloat16 is near half an ulp in the
    # direction the fuse's cast already went: an unfuse that subtracts the delta cast to the
    # weight's dtype lands 2.6 times the round trip's bound away from the weight, a float32
    # unfuse 0.82 of it (found by search; random draws meet such a pair under some seeds only).
    return [
        _case(
            [[-0.51171875]],
            torch.bfloat16,
            [[8.279741287231445]],
            [[1.0]],
            1.0,
            "random",
            "a delta 16 times the weight: its rounding to bfloat16 is not within a round trip's bound",
        )
    ]


def _ordinary() -> list[MergeCase]:
    return [*_at_the_limit(), *_delta_rounding_beyond_the_bound()]


def _just_past_the_threshold() -> list[MergeCase]:
    # The float32 sum lands a quarter of the way from the threshold to the next value:
    # beyond the range, so it must be refused (e4m3fn saturates silently to 448 there).
    cases = []
    for dtype in _NARROW:
        largest = float(torch.finfo(dtype).max)
        threshold = safemerge.numerics.overflow_threshold(dtype)
        step = 1.25 * (threshold - largest)
        cases.append(
            _case(
                [[largest]],
                dtype,
                [[step]],
                [[1.0]],
                1.0,
                "cast-overflow",
                f"{largest:g} + {step:g} is just past {dtype}'s threshold {threshold:g}",
            )
        )
    return cases


def _delta_past_the_range() -> list[MergeCase]:
    # The float32 delta alone is beyond the dtype's range, the sum well inside it: a merge
    # that casts the delta to the weight's dtype (PEFT: ``delta_weight.to(orig_dtype)``)
    # or checks it there refuses a finite result.
    cases = [
        _case(
            [[-60000.0]],
            torch.float16,
            [[70000.0]],
            [[1.0]],
            1.0,
            "delta-overflow",
            "-60000 + 70000 = 10000: the delta alone is Inf in float16 (PEFT refuses it)",
        )
    ]
    for dtype in _NARROW:
        largest = float(torch.finfo(dtype).max)
        threshold = safemerge.numerics.overflow_threshold(dtype)
        # Halfway from the threshold to max * 1.5 (float32's max for bfloat16).
        delta = representable((threshold + min(1.5 * largest, F32_MAX)) / 2, torch.float32)
        cases.append(
            _case(
                [[0.0, -largest]],
                dtype,
                [[0.0, delta]],
                [[1.0]],
                1.0,
                "delta-overflow",
                f"-{largest:g} + {delta:g} = {delta - largest:g} in the last element: the "
                f"delta alone is beyond {dtype}'s threshold {threshold:g}",
            )
        )
    return cases


def _hidden_non_finite(kind: str) -> list[MergeCase]:
    value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
    return [
        _case([[0.0]], torch.float32, [[value]], [[1.0]], 0.0, kind, f"{kind} in lora_A, scale 0"),
        _case([[0.0]], torch.float32, [[value]], [[1.0]], -0.0, kind, f"{kind}, scale -0.0"),
        _case(
            [[0.0, 0.0], [0.0, 0.0]],
            torch.bfloat16,
            [[value, 1.0]],
            [[0.0], [0.0]],
            1.0,
            kind,
            f"{kind} in lora_A, lora_B all zero (as PEFT initialises it)",
        ),
    ]


def _subnormal_results() -> list[MergeCase]:
    # float32 and bfloat16 share float32's subnormals: a merge that flushes them to zero
    # (set_flush_denormal, or fast-math kernels) loses these results.
    tiny = 2.0**-140
    return [
        _case(
            [[0.0, 0.0]],
            dtype,
            [[tiny, 3 * tiny]],
            [[1.0]],
            1.0,
            "subnormal",
            f"{dtype} result of float32 subnormals on a zero weight",
        )
        for dtype in (torch.float32, torch.bfloat16)
    ]


def known_cases(kind: str, dtype: torch.dtype | None = None) -> list[MergeCase]:
    """The hand-written cases of one kind of :func:`pytest_safemerge.strategies.merge_cases`;
    with ``dtype``, only those whose weight has that dtype."""
    cases = _KNOWN.get(kind, list)()
    return [case for case in cases if dtype is None or case.weight.dtype == dtype]


_KNOWN: dict[str, Callable[[], list[MergeCase]]] = {
    "random": _ordinary,
    "cast-overflow": _just_past_the_threshold,
    "delta-overflow": _delta_past_the_range,
    "nan": lambda: _hidden_non_finite("nan"),
    "+inf": lambda: _hidden_non_finite("+inf"),
    "-inf": lambda: _hidden_non_finite("-inf"),
    "subnormal": _subnormal_results,
}


#: A large weight's side: 65 x 65 = 4225 elements, so that blocks of 4096, 2048, 1024 or
#: 64 elements leave a partial last block, which holds the last row.
_LARGE_SIDE = 65


def known_large_cases(kind: str, dtype: torch.dtype) -> list[MergeCase]:
    """A large weight whose only non-finite (or overflowing) merged elements are in its
    last row: a guard that checks in blocks and skips the partial last one lets them
    through. For the refusal kinds; none for other kinds."""
    side = _LARGE_SIDE
    weight = torch.zeros(side, side)
    lora_A = torch.ones(1, side)
    lora_B = torch.zeros(side, 1)
    if kind in ("nan", "+inf", "-inf"):
        # B's last row alone is non-finite: NaN * 0 is NaN, so a non-finite value in A
        # would spread over a whole column, into the first block.
        lora_B[-1, 0] = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]
        detail = f"{kind} in lora_B's last row: only the weight's last row is not finite"
    elif kind == "cast-overflow" and dtype != torch.float32:
        largest = float(torch.finfo(dtype).max)
        threshold = safemerge.numerics.overflow_threshold(dtype)
        weight[-1, -1] = largest
        lora_A.zero_()
        lora_A[0, -1] = 1.25 * (threshold - largest)
        lora_B[-1, 0] = 1.0
        detail = f"the last element, {largest:g}, pushed past {dtype}'s threshold {threshold:g}"
    else:
        return []
    adapter = safemerge.LoraAdapter(lora_A, lora_B)
    return [MergeCase(weight.to(dtype), adapter, 1.0, kind, detail)]
