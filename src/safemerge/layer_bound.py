"""Checking a fused layer against its error bound, every element, in bounded memory.

:func:`safemerge.merge_bound` gives the exact merge and its bound in float64, three or
four float64 temporaries the size of the weight: for a 14336 x 4096 projection that is
1.8 GB, much more than the bfloat16 weight. Each element's reference and bound depend
only on its own row of ``M`` and of ``left`` (and all of ``right``), so the check runs
row block by row block, with the same formulas, and never holds more than a block's
float64 work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safemerge import bounds
from safemerge.adapter import LoraAdapter
from safemerge.layers import LayerView, view_layer
from safemerge.reference import expected_fuse

#: Elements of float64 work per block: 512 KiB per temporary, so a block's dozen or so
#: temporaries stay near the caches (measured 2x faster than 2 MiB on a 2-core EPYC).
BLOCK_ELEMENTS = 1 << 16


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
        The worst ratio (at most 1 for a correct fuse); ``inf`` where an element differs
        from the exact value with a zero bound.
    """
    rows, columns = original.shape
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    worst = 0.0
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block_terms = [(left[start:stop], right, c) for left, right, c in terms]
        reference, bound = bounds.merge_bound(original[start:stop], block_terms, dtype)
        worst = max(worst, _worst_ratio(fused[start:stop], reference, bound))
    return worst


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
