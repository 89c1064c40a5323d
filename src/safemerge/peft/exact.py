"""Exact merges of PEFT LoRA layers that stay attached: merged with their corrections kept,
marked merged the way PEFT marks them, and undone bit for bit.

The one implementation behind :func:`safemerge.peft.merge` / :func:`safemerge.peft.unmerge`
and :func:`safemerge.diffusers.fuse_lora` / :func:`safemerge.diffusers.unfuse_lora`. The
layers handed in may come from several models (a pipeline's UNet and text encoders): the
merge is one transaction over all of them.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from safemerge.errors import ModelFuseError
from safemerge.layer import fuse, unfuse
from safemerge.merge import engine
from safemerge.merge.record import FuseRecord
from safemerge.model.report import ModelFuseReport, TensorResult
from safemerge.model.transaction import interrupts_deferred, roll_back
from safemerge.peft.layers import PeftLayer
from safemerge.peft.threads import merge_threads
from safemerge.quant import bnb
from safemerge.quant.quantized import QuantizedFuseRecord

Record = FuseRecord | QuantizedFuseRecord

#: Per LoRA layer, the merges :func:`merge_layers` made, oldest first: (adapter names, record).
_MERGES: weakref.WeakKeyDictionary[nn.Module, list[tuple[tuple[str, ...], Record]]] = (
    weakref.WeakKeyDictionary()
)


def merge_layers(planned: Sequence[PeftLayer], *, progressbar: bool = False) -> ModelFuseReport:
    """Merge every planned layer keeping its correction, all or nothing, and mark it merged.

    Raises:
        NonFiniteMergeError: a layer's merge would not be finite; every layer merged before
            it was restored exactly (any other exception, Ctrl-C included, likewise).
    """
    started = time.perf_counter()
    records = fuse_with_rollback(planned, progressbar=progressbar)
    results = []
    with interrupts_deferred():  # every fused layer is marked, or none
        for position, layer in enumerate(planned, start=1):
            record = records[layer.weight_name]
            _MERGES.setdefault(layer.lora_layer, []).append((layer.adapter_names, record))
            layer.lora_layer.merged_adapters.extend(layer.adapter_names)
            results.append(_result(layer, record, position, len(planned)))
    return ModelFuseReport.in_memory(results, records, seconds=time.perf_counter() - started)


def fuse_with_rollback(
    planned: Sequence[PeftLayer], *, progressbar: bool = False
) -> dict[str, Record]:
    """Fuse each layer keeping its correction; on any failure unfuse all of them exactly."""
    records: dict[str, Record] = {}
    current = ""
    # One thread count for the whole transaction: each record keeps torch's (one), and the
    # rollback below and every later exact unfuse repeat it; the blocks share out the cores.
    with engine.blocks_on(merge_threads()):
        try:
            for layer in progress(planned, progressbar, "Merging (safemerge)"):
                current = layer.weight_name
                with interrupts_deferred():  # a fused layer always has its record kept
                    records[current] = fuse(layer.base, list(layer.pairs), name=current)
        except BaseException as error:
            layers = {layer.weight_name: (layer.base, list(layer.pairs)) for layer in planned}
            restored = roll_back(layers, records, failed=current, error=error)
            if isinstance(error, Exception) and not isinstance(error, ModelFuseError):
                error.add_note(
                    f"safemerge: layer {current!r} failed; the {len(restored)} layer(s) merged "
                    f"before it were restored exactly: nothing was changed, adapters attached"
                )
            raise
    return records


def merged_layers(model: nn.Module, *, prefix: str = "") -> list[tuple[str, Any]]:
    """The LoRA layers of ``model`` that hold merges made by :func:`merge_layers`."""
    return [
        (prefix + name, module) for name, module in model.named_modules() if _MERGES.get(module)
    ]


def merged_adapter_names(lora_layer: Any) -> list[str]:
    """The adapters :func:`merge_layers` merged into ``lora_layer``, oldest first."""
    return [name for names, _ in _MERGES.get(lora_layer, []) for name in names]


def changed_since_merge(layers: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the merged layers whose weights changed since their latest merge."""
    return [name for name, layer in layers if not _unchanged(layer, _MERGES[layer][-1][1])]


def undo_merges(layers: Iterable[tuple[str, Any]]) -> None:
    """Undo every merge of each layer, newest first, restoring the base bits exactly.

    Call :func:`changed_since_merge` first: a layer changed since its merge is refused by
    :func:`safemerge.unfuse` (a ``RestoreError``) only when its own turn comes.
    """
    with interrupts_deferred():
        for _, layer in layers:
            merges = _MERGES[layer]
            while merges:
                names, record = merges[-1]
                unfuse(layer.get_base_layer(), record, exact=True)
                merges.pop()
                for adapter_name in names:
                    layer.merged_adapters.remove(adapter_name)


def progress(layers: Sequence[PeftLayer], enabled: bool, description: str) -> Iterator[PeftLayer]:
    """``layers``, behind a tqdm progress bar when ``enabled``."""
    if not enabled:
        yield from layers
        return
    from tqdm import tqdm

    yield from tqdm(layers, desc=description)


def _unchanged(lora_layer: Any, record: Record) -> bool:
    base = lora_layer.get_base_layer()
    quantized_format = bnb.format_of(base, record.layer)
    data = quantized_format.data() if quantized_format is not None else base.weight
    return engine.fingerprint(data) == record.fused_fingerprint


def _result(layer: PeftLayer, record: Record, position: int, total: int) -> TensorResult:
    return TensorResult(
        name=layer.weight_name,
        kind=record.kind,
        shape=tuple(record.shape),
        dtype=record.dtype if isinstance(record, FuseRecord) else torch.uint8,
        worst_error_of_bound=None,
        seconds=record.seconds,
        adapters=len(layer.pairs),
        position=position,
        total=total,
    )
