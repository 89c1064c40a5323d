"""Checking a fused layer against its error bound, every element, in bounded memory.

:func:`safemerge.merge_bound` gives the exact merge and its bound in float64, with
float64 temporaries the size of the weight: for a 14336 x 4096 projection that is
several GB, far more than the bfloat16 weight. Each element's reference and bound
depend only on its own row of ``M`` and of ``left`` (and all of ``right``), so
:func:`block_bound` evaluates the same bound row block by row block, rearranged to cost
less: one matmul gives every term's ``|left| @ |right|`` (the ``gamma_n`` and the
coefficients' float32 rounding folded into ``|left|``), and the final cast's half ulp
comes from the float64 exponent bits (exact, where ``log2`` can round a value just
below a power of two up to it). The tests hold it to :func:`safemerge.merge_bound`.

The check runs on one thread: its blocks are small (to stay in cache) and many, and on a
busy machine every parallel region waits for its slowest thread: with two threads on two
shared cores, it measured 40x slower than with one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safemerge.merge import bounds, engine
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.numerics import FLOAT32_TINY_SUBNORMAL, MANTISSA_BITS
from safemerge.merge.reference import expected_fuse
from safemerge.merge.view import LayerView, view_layer

#: Elements of float64 work per block: 512 KiB per temporary, so a block's handful of
#: temporaries stays near the caches (measured 2x faster than 2 MiB on a 2-core EPYC).
BLOCK_ELEMENTS = 1 << 16

_FLOAT64_MANTISSA_BITS = 52
_FLOAT64_EXPONENT_BIAS = 1023


def worst_error_of_bound(
    original: torch.Tensor,
    fused: torch.Tensor,
    terms: Sequence[bounds.Term],
    dtype: torch.dtype,
) -> float:
    """``max |fused - exact| / bound`` over every element of a plain (non-DoRA) merge.

    Args:
        original: the weight before the fuse, as the matrix ``M`` (rows x columns).
        fused: the weight after the fuse, in the same layout.
        terms: ``(left, right, coefficient)`` per adapter, in ``M``'s layout.
        dtype: the weight's dtype (the final cast's).

    Returns:
        The worst ratio: at most 1 for a correct fuse.
    """
    rows, columns = original.shape
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    worst = 0.0
    with engine.pinned_threads(1):
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block_terms = [(left[start:stop], right, c) for left, right, c in terms]
            reference, bound = block_bound(original[start:stop], block_terms, dtype)
            error = fused[start:stop].to(torch.float64).sub_(reference).abs_()
            worst = max(worst, float(error.div_(bound).max()) if error.numel() else 0.0)
    return worst


def block_bound(
    weight: torch.Tensor, terms: Sequence[bounds.Term], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`safemerge.merge_bound`'s ``(reference, bound)``, computed with fewer passes.

    The reference is computed as :func:`safemerge.bounds.reference_merge` does, to the
    bit. The bound is the same sum, ``gamma_n (|W| + sum |c32_i| P_i) + sum |c_i - c32_i|
    P_i + underflow + n * tiny`` plus half an ulp of ``dtype`` at ``|reference| + that``,
    with ``P_i = |left_i| @ |right_i|``, evaluated in another order (float64 rounding
    apart, the same number), and always positive.
    """
    reference = bounds.reference_merge(weight, terms)
    n = bounds.roundings([left.shape[1] for left, _, _ in terms])
    gamma = bounds.gamma(n)
    lefts, rights = [], []
    underflow = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for left, right, coefficient in terms:
        rounded = float(torch.tensor(coefficient, dtype=torch.float32))
        right_abs = right.to(torch.float64).abs()
        lefts.append(
            left.to(torch.float64).abs() * (gamma * abs(rounded) + abs(coefficient - rounded))
        )
        rights.append(right_abs)
        underflow += right_abs.sum(dim=0) * (FLOAT32_TINY_SUBNORMAL / 2)
    underflow += n * FLOAT32_TINY_SUBNORMAL
    start = weight.to(torch.float64, copy=True).abs_().mul_(gamma).add_(underflow)
    bound = torch.addmm(start, torch.cat(lefts, dim=1), torch.cat(rights, dim=0))
    if dtype != torch.float32:
        bound += _half_ulp(reference.abs().add_(bound), dtype)
    return reference, bound


def _half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype``'s grid at each (float64, non-negative) magnitude.

    ``dtype``'s subnormals share the spacing of its smallest normal; every magnitude is
    then a normal float64, whose exponent bits are ``floor(log2(magnitude))`` exactly.
    """
    smallest_normal = torch.finfo(dtype).smallest_normal
    bits = magnitude.clamp_(min=smallest_normal).view(torch.int64)
    exponent = bits.bitwise_right_shift_(_FLOAT64_MANTISSA_BITS)  # biased, sign bit is 0
    exponent -= MANTISSA_BITS[dtype] + 1
    return exponent.bitwise_left_shift_(_FLOAT64_MANTISSA_BITS).view(torch.float64)


def layer_terms(
    view: LayerView, pairs: Sequence[tuple[LoraAdapter, float]], coefficients: Sequence[float]
) -> list[bounds.Term]:
    """Each adapter's ``(left, right, coefficient)`` in the view's matrix layout."""
    terms: list[bounds.Term] = []
    for (adapter, _), coefficient in zip(pairs, coefficients, strict=True):
        left, right = view.factors(adapter)
        device = view.weight.device
        terms.append((left.detach().to(device), right.detach().to(device), coefficient))
    return terms


class BoundCheck:
    """Take what a layer's check needs before its fuse, then compare after.

    DoRA's renormalised bound needs whole-column norms, so a DoRA layer goes through
    :func:`safemerge.expected_fuse` (float64 temporaries the size of the weight); any
    other layer keeps a copy of its weight and is checked block by block.
    """

    def __init__(
        self, layer: nn.Module, name: str, pairs: Sequence[tuple[LoraAdapter, float]], scale: float
    ) -> None:
        self._view = view_layer(layer, name)
        self._pairs = list(pairs)
        self._expected: tuple[torch.Tensor, torch.Tensor] | None = None
        self._original: torch.Tensor | None = None
        if any(adapter.is_dora for adapter, _ in pairs):
            self._expected = expected_fuse(layer, self._pairs, scale=scale)
        else:
            self._original = self._view.matrix.clone()

    def worst(self, coefficients: Sequence[float]) -> float:
        """The fused layer's worst ``|fused - exact| / bound``."""
        fused = self._view.matrix
        if self._expected is not None:
            reference, bound = self._expected
            return _worst_ratio(fused.reshape(reference.shape), reference, bound)
        assert self._original is not None
        terms = layer_terms(self._view, self._pairs, coefficients)
        return worst_error_of_bound(self._original, fused, terms, self._view.weight.dtype)


def _worst_ratio(fused: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    error = (fused.to(torch.float64) - reference).abs()
    if bool((error[bound == 0] > 0).any()):
        return float("inf")
    ratio = error / bound.clamp_min(torch.finfo(torch.float64).tiny)
    return float(ratio.max()) if ratio.numel() else 0.0
