"""Proving, before any work on the weight, that a fuse cannot overflow.

The guard sees overflow only in the merged result, which costs a full pass to compute. A
whole-model merge that must change nothing when any layer would overflow can still skip
a pass over each layer when a bound says the merge fits: every element of the float32
merge of a layer is at most

    (max|W| + sum_t |c_t| * max_i ||left_t[i, :]||_1 * max|right_t|) * (1 + (R + 4) * u32)

(``R`` the total rank: ``gamma_(R+2)`` for the accumulation, plus the coefficient's own
rounding into ``left``), which takes ``O(rank * (in + out))`` work and one read of ``W``.
A layer whose bound stays below the dtype's overflow threshold cannot be refused by the
guard; any other layer (DoRA, a non-finite factor, a weight near its dtype's range) has
to be merged to find out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.numerics import U32, overflow_threshold
from safemerge.merge.view import LayerView

#: Proven layers keep this fraction of the threshold in reserve, so that nothing in the
#: argument hangs on the last ulp of a float64 evaluation of the bound.
_MARGIN = 0.5


def weight_magnitude(weight: torch.Tensor) -> float:
    """``max |W|`` from one pass with no temporary; inf for dtypes torch cannot reduce."""
    if weight.numel() == 0:
        return 0.0
    try:
        low, high = torch.aminmax(weight.detach())
    except (RuntimeError, NotImplementedError):  # float8 has no min/max kernels
        return math.inf
    return max(-float(low), float(high))


def cannot_overflow(
    view: LayerView,
    pairs: Sequence[tuple[LoraAdapter, float]],
    coefficients: Sequence[float],
    *,
    magnitude: float,
    dtype: torch.dtype,
) -> bool:
    """Whether fusing ``pairs`` into a weight with ``max|W| <= magnitude`` certainly fits ``dtype``.

    False proves nothing (the merge may still fit); DoRA adapters are never proven here
    (their factor depends on the merged weight's norms).
    """
    if any(adapter.is_dora for adapter, _ in pairs) or not math.isfinite(magnitude):
        return False
    float32_limit = _MARGIN * float(torch.finfo(torch.float32).max)
    total = magnitude
    rank = 0
    with torch.no_grad():
        for (adapter, _), coefficient in zip(pairs, coefficients, strict=True):
            left, right = (
                factor.detach().to(torch.float64).abs() for factor in view.factors(adapter)
            )
            largest_row = float(left.sum(dim=1).max()) if left.numel() else 0.0
            largest_left = float(left.max()) if left.numel() else 0.0
            largest_right = float(right.max()) if right.numel() else 0.0
            # The engine holds c * left and right in float32: each must fit on its own.
            if not abs(coefficient) * largest_left < float32_limit > largest_right:
                return False  # also False for a NaN anywhere
            total += abs(coefficient) * largest_row * largest_right
            rank += adapter.rank
    bound = total * (1 + (rank + 4) * U32)
    threshold = min(overflow_threshold(dtype), float(torch.finfo(torch.float32).max))
    return bound < _MARGIN * threshold  # False for NaN and Inf
