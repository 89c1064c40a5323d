"""Hand-written cases that real merge code has got wrong, run first by every property.

Generated cases find most bugs; these pin the ones that hide in a corner a random draw
rarely visits: a result exactly at the dtype's largest value, a sum just past its
overflow threshold, a NaN behind a zero scale or a zero ``lora_B``, a subnormal result
on a zero weight.
"""

from __future__ import annotations

import math

import torch

import safemerge
from pytest_safemerge.strategies import MergeCase

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


def known_cases(kind: str) -> list[MergeCase]:
    """The hand-written cases of one kind of :func:`pytest_safemerge.strategies.merge_cases`."""
    if kind == "random":
        return _at_the_limit()
    if kind == "cast-overflow":
        return _just_past_the_threshold()
    if kind in ("nan", "+inf", "-inf"):
        return _hidden_non_finite(kind)
    if kind == "subnormal":
        return _subnormal_results()
    return []
