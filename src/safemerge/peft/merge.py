"""Guarded, all-or-nothing merges of a PEFT model's LoRA adapters.

:func:`merge_and_unload` is a drop-in for PEFT's ``merge_and_unload``: the same result
(the base model with every LoRA layer replaced by its merged base layer), computed in
float32 with safemerge's guard, and all or nothing. It works in three steps:

1. plan: every LoRA layer and adapter is checked (:func:`safemerge.peft.layers.plan_merge`);
2. prove: for each layer, :func:`safemerge.merge.headroom.cannot_overflow` shows from the
   adapter factors and ``max|W|`` that the guard cannot refuse it; the few layers it
   cannot vouch for (DoRA, a broken adapter, a weight near its dtype's range) are merged
   first, each keeping its exact-unfuse correction, and a refusal among them unmerges
   them exactly;
3. commit: the proven layers are merged without corrections, still through the guard,
   each computed in one buffer (the largest weight's bytes, reused from layer to layer)
   and then copied in (:func:`safemerge.layer.fuse_in_buffer`), so that no block journal
   is needed for a failure midway.

:func:`merge` keeps the adapters attached and marks them merged, as PEFT's
``merge_adapter`` does, but keeps each layer's correction so that :func:`unmerge` gives
back the base weights bit for bit (PEFT's unmerge subtracts, which does not).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from safemerge.errors import RestoreError
from safemerge.layer import buffer_bytes, fuse_in_buffer
from safemerge.merge.engine import block_threads, blocks_on, pinned_threads
from safemerge.merge.headroom import cannot_overflow, weight_magnitude
from safemerge.merge.request import coefficients, merged_bias
from safemerge.model.report import ModelFuseReport
from safemerge.model.transaction import interrupts_deferred
from safemerge.peft.exact import (
    changed_since_merge,
    fuse_with_rollback,
    merge_layers,
    merged_layers,
    progress,
    undo_merges,
)
from safemerge.peft.layers import PeftLayer, layer_view, lora_tuner, plan_merge
from safemerge.peft.threads import merge_threads
from safemerge.quant import bnb


def merge_and_unload(
    model: Any,
    *,
    progressbar: bool = False,
    safe_merge: bool = True,
    adapter_names: Sequence[str] | None = None,
) -> nn.Module:
    """Merge the LoRA adapters into the base model and return it without them.

    The same contract as PEFT's ``model.merge_and_unload()``: ``adapter_names`` None
    merges each layer's active adapters; adapters already merged are not merged again;
    ``modules_to_save`` copies replace their originals; the returned module is the base
    model, changed in place.

    Args:
        model: a ``peft.PeftModel`` or ``peft.LoraModel``.
        progressbar: show a progress bar over the layers.
        safe_merge: accepted for compatibility; the merge is always guarded.
        adapter_names: the adapters to merge.

    Returns:
        The base model (``model.base_model.model``), holding the merged weights.

    Raises:
        ModelFuseError: before any change, listing every layer that cannot be merged.
        NonFiniteMergeError: a layer's merge would not be finite; the model is unchanged,
            adapters attached and usable.
    """
    del safe_merge  # always safe
    tuner = lora_tuner(model)
    tuner._check_merge_allowed()  # PEFT's own refusals (GPTQ, replicated layers)
    planned = plan_merge(tuner.model, adapter_names)
    with interrupts_deferred():  # a merged model always gets unloaded
        _merge_all_or_nothing(planned, progressbar=progressbar)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes on merging, which it did not do
            unloaded: nn.Module = tuner.unload()
    return unloaded


def merge(
    model: Any, *, adapter_names: Sequence[str] | None = None, progressbar: bool = False
) -> ModelFuseReport:
    """Merge LoRA adapters into the base weights, keeping them attached (PEFT's
    ``merge_adapter``), so that :func:`unmerge` can restore every bit.

    The layers are marked merged the way PEFT marks them (``merged_adapters``), so the
    model's forward uses the merged weights. Each layer keeps its exact-unfuse
    correction (about a quarter byte per weight element; for a bitsandbytes layer, its
    packed bytes): the report's records say how much.

    Raises:
        ModelFuseError: before any change, listing every layer that cannot be merged.
        NonFiniteMergeError: a layer's merge would not be finite; every layer merged
            before it was restored exactly, and the model is as it was.
    """
    tuner = lora_tuner(model)
    return merge_layers(plan_merge(tuner.model, adapter_names), progressbar=progressbar)


def unmerge(model: Any) -> None:
    """Undo every :func:`merge` of ``model``, restoring the base weights bit for bit.

    Raises:
        RestoreError: before any change, when a layer changed since its merge (PEFT's own
            ``merge``/``unmerge`` on it, or a training step), naming every such layer.
    """
    undo = merged_layers(lora_tuner(model).model)
    changed = changed_since_merge(undo)
    if changed:
        raise RestoreError(
            f"cannot unmerge exactly: {len(changed)} layer(s) changed since safemerge merged "
            f"them ({changed[:5]}); nothing was unmerged. PEFT's own merge or unmerge, or a "
            f"training step, touched them: reload the base model instead"
        )
    undo_merges(undo)


# -- the steps -----------------------------------------------------------------------------


def _merge_all_or_nothing(planned: list[PeftLayer], *, progressbar: bool) -> None:
    """Merge every planned layer, the unproven ones first with their corrections kept."""
    with blocks_on(merge_threads()):  # see safemerge.peft.threads
        proven: list[PeftLayer] = []
        unproven: list[PeftLayer] = []
        for layer in planned:
            (proven if _proven(layer) else unproven).append(layer)
        fuse_with_rollback(unproven, progressbar=False)
        largest = max((buffer_bytes(layer.base) for layer in proven), default=0)
        buffer = torch.empty(largest, dtype=torch.uint8)
        for layer in progress(proven, progressbar, "Merging (safemerge)"):
            # Proven: the guard inside cannot refuse, so no correction is kept.
            fuse_in_buffer(layer.base, list(layer.pairs), name=layer.weight_name, buffer=buffer)


def _proven(layer: PeftLayer) -> bool:
    """Whether ``layer``'s merge certainly fits its dtype (its bias is checked here too)."""
    pairs = list(layer.pairs)
    quantized_format = bnb.format_of(layer.base, layer.weight_name)
    view = layer_view(layer)
    with torch.no_grad():
        if quantized_format is not None:
            magnitude = quantized_format.magnitude_limit()
            dtype = quantized_format.merge_dtype
        else:
            with pinned_threads(block_threads()):  # a pass over the whole weight
                magnitude = weight_magnitude(view.weight)
            dtype = view.weight.dtype
        factors = coefficients(pairs, 1.0)
        try:
            merged_bias(view, pairs, factors, sign=1.0)  # guarded; small
        except ValueError:
            return False
        return cannot_overflow(view, pairs, factors, magnitude=magnitude, dtype=dtype)
