"""The exact (float64) result a fuse should give for a layer, with its error bound."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safemerge.merge import bounds
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.view import view_layer


def expected_fuse(
    layer: nn.Module,
    adapters: Sequence[tuple[LoraAdapter, float]],
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What fusing ``adapters`` into ``layer`` must give, before anything is changed.

    Returns:
        ``(reference, bound)``, float64 tensors of the weight's shape: a correct fuse
        leaves ``|weight - reference| <= bound`` everywhere.
    """
    view = view_layer(layer)
    matrix = view.weight.detach()
    terms = []
    for adapter, weight in adapters:
        left, right = view.factors(adapter)
        terms.append((left.detach(), right.detach(), weight * adapter.scale * scale))
    matrix = matrix.reshape(view.matrix_shape)
    magnitude = adapters[0][0].magnitude if len(adapters) == 1 else None
    if magnitude is None:
        reference, bound = bounds.merge_bound(matrix, terms, view.weight.dtype)
    else:
        plain = bounds.reference_merge(matrix, terms)
        accumulated = bounds.accumulation_bound(matrix, terms)
        reference, bound = bounds.renormalised_bound(
            plain,
            accumulated,
            magnitude.detach(),
            along_rows=not view.transposed,
            dtype=view.weight.dtype,
        )
    return reference.reshape(view.weight.shape), bound.reshape(view.weight.shape)
