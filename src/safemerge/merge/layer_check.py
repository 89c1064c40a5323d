"""A layer's check against its error bound: what it takes before the fuse, then the
comparison after (:func:`safemerge.merge.bound_check.worst_error_of_bound` for a plain
merge, :func:`safemerge.expected_fuse` for DoRA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safemerge.merge import bounds
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.bound_check import worst_error_of_bound
from safemerge.merge.reference import expected_fuse
from safemerge.merge.view import LayerView, view_layer


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
    other layer is checked block by block against its weight as it was: a copy, taken
    here, or (``copy_original=False``, for a fuse into new tensors that leaves the layer
    as it is) the layer's weight itself.
    """

    def __init__(
        self,
        layer: nn.Module,
        name: str,
        pairs: Sequence[tuple[LoraAdapter, float]],
        scale: float,
        *,
        copy_original: bool = True,
    ) -> None:
        self._view = view_layer(layer, name)
        self._pairs = list(pairs)
        self._expected: tuple[torch.Tensor, torch.Tensor] | None = None
        self._original: torch.Tensor | None = None
        if any(adapter.is_dora for adapter, _ in pairs):
            self._expected = expected_fuse(layer, self._pairs, scale=scale)
        else:
            matrix = self._view.matrix
            self._original = matrix.clone() if copy_original else matrix

    def worst(self, coefficients: Sequence[float], fused: torch.Tensor | None = None) -> float:
        """The fused weight's worst ``|fused - exact| / bound``: ``fused``, shaped as the
        layer's weight, or else the layer's own weight (fused in place)."""
        matrix = self._view.matrix if fused is None else fused.reshape(self._view.matrix_shape)
        if self._expected is not None:
            reference, bound = self._expected
            return _worst_ratio(matrix.reshape(reference.shape), reference, bound)
        assert self._original is not None
        terms = layer_terms(self._view, self._pairs, coefficients)
        return worst_error_of_bound(self._original, matrix, terms, self._view.weight.dtype)


def _worst_ratio(fused: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    error = (fused.to(torch.float64) - reference).abs()
    if bool((error[bound == 0] > 0).any()):
        return float("inf")
    ratio = error / bound.clamp_min(torch.finfo(torch.float64).tiny)
    return float(ratio.max()) if ratio.numel() else 0.0
