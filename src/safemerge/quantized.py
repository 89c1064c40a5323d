"""Guarded, all-or-nothing fuse into bitsandbytes 4-bit layers: dequantize, merge, requantize.

The merge itself is the float path's (float32, guarded) on the dequantized weight; the
result is requantized with the layer's own settings (quant type, blocksize, nesting,
storage). Every element is checked against its own block's rounding bound, and what was
changed is reported: requantization swallows small deltas whole. Unfuse restores the
original packed bytes and quantization state (half a byte per weight, kept on the CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from safemerge import bnb, engine
from safemerge.adapter import LoraAdapter
from safemerge.errors import RestoreError, UnsupportedLayerError
from safemerge.layers import LayerView
from safemerge.quant_grid import blockwise_bound
from safemerge.request import check_request, low_rank_delta, merged_bias

#: Random inputs used to report how much the requantized layer's output moved.
REPORT_INPUTS = 64


@dataclass(frozen=True, eq=False)
class QuantizedFuseRecord:
    """What a fuse into a 4-bit layer did; pass it to :func:`safemerge.unfuse`.

    Attributes:
        layer, kind, shape: the layer (``kind`` is ``"linear4bit"``) and its weight's shape.
        quant_type, blocksize, nested: the quantization settings, kept through the fuse.
        adapters, scale, coefficients: as in :class:`safemerge.FuseRecord`.
        original: the packed bytes and quantization state before the fuse.
        original_bias: a copy of the bias before the fuse, when the fuse changed it.
        worst_error_of_bound: the largest ``|dequantized - ideal| / bound`` over all
            elements, ``ideal`` the float32 merge, ``bound`` the element's block bound.
        blocks: number of absmax blocks in the weight.
        blocks_changed: blocks whose codes or absmax the fuse changed at all.
        elements_changed: elements whose dequantized value changed.
        output_error: ``||x (W_q' - W_q)^T - x delta^T|| / ||x delta^T||`` over random
            inputs ``x``: how far the layer's output change is from the adapter's effect
            (0: kept exactly; 1: lost whole, as when the delta vanishes in requantization).
        seconds: wall time of the fuse.
    """

    layer: str
    kind: str
    shape: tuple[int, int]
    quant_type: str
    blocksize: int
    nested: bool
    adapters: tuple[tuple[LoraAdapter, float], ...]
    scale: float
    coefficients: tuple[float, ...]
    original: bnb.Snapshot4bit
    original_bias: torch.Tensor | None
    worst_error_of_bound: float
    blocks: int
    blocks_changed: int
    elements_changed: int
    output_error: float
    seconds: float

    @property
    def exact(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        """Bytes kept to undo the fuse exactly: packed weight, absmax, original bias."""
        bias = (
            0
            if self.original_bias is None
            else self.original_bias.numel() * self.original_bias.element_size()
        )
        return self.original.nbytes + bias

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weight itself."""
        return self.original.data.numel() * self.original.data.element_size()

    def summary(self) -> str:
        return (
            f"{self.layer} ({self.quant_type}, blocksize {self.blocksize}"
            f"{', nested' if self.nested else ''}): {self.blocks_changed:,} of {self.blocks:,} "
            f"blocks changed ({self.elements_changed:,} elements); worst error "
            f"{self.worst_error_of_bound:.3f} of its block bound; output error "
            f"{self.output_error:.3g} of the adapter's effect; {self.seconds * 1e3:.1f} ms"
        )


def fuse_4bit(
    layer: Any, pairs: list[tuple[LoraAdapter, float]], *, scale: float, name: str | None
) -> QuantizedFuseRecord:
    """Fuse into a bitsandbytes ``Linear4bit``; see :func:`safemerge.fuse`."""
    started = time.perf_counter()
    label = name or type(layer).__name__
    settings = bnb.settings(layer)
    if any(adapter.is_dora for adapter, _ in pairs):
        raise UnsupportedLayerError(
            f"layer {label!r}: DoRA adapters are not fused into 4-bit layers"
        )
    original = bnb.snapshot(layer)
    with torch.no_grad():
        weight = bnb.dequantized(layer)
        bias = layer.bias if isinstance(layer.bias, torch.Tensor) else None
        view = LayerView(label, "linear4bit", weight, bias, settings.shape, transposed=False)
        check_request(view, pairs, scale)
        coefficients = tuple(weight_ * adapter.scale * scale for adapter, weight_ in pairs)
        delta = low_rank_delta(view, pairs, coefficients)
        new_bias = merged_bias(view, pairs, coefficients, sign=1.0)
        ideal = engine.fuse_matrix(
            weight, delta, layer=label, weight_shape=settings.shape, keep_correction=False
        ).merged
        assert ideal is not None
        packed, state = bnb.quantize(ideal, settings)
        report = _report(weight, ideal, packed, state, delta, settings)
        original_bias = None if new_bias is None or bias is None else bias.detach().cpu().clone()
        bnb.commit(layer, packed, state)
        if new_bias is not None and bias is not None:
            bias.detach().copy_(new_bias)
    return QuantizedFuseRecord(
        layer=label,
        kind="linear4bit",
        shape=settings.shape,
        quant_type=settings.quant_type,
        blocksize=settings.blocksize,
        nested=settings.nested,
        adapters=tuple(pairs),
        scale=scale,
        coefficients=coefficients,
        original=original,
        original_bias=original_bias,
        seconds=time.perf_counter() - started,
        **report,
    )


def unfuse_4bit(layer: Any, record: QuantizedFuseRecord, *, exact: bool = True) -> None:
    """Undo :func:`fuse_4bit`: the original bytes back, or (``exact=False``) subtract and requantize."""
    if not bnb.is_4bit_layer(layer) or bnb.settings(layer).shape != record.shape:
        raise RestoreError(
            f"the record is for a 4-bit layer {record.layer!r} of shape {record.shape}"
        )
    with torch.no_grad():
        bias = layer.bias if isinstance(layer.bias, torch.Tensor) else None
        if exact:
            bnb.restore(layer, record.original)
            if record.original_bias is not None and bias is not None:
                bias.detach().copy_(record.original_bias)
            return
        settings = bnb.settings(layer)
        weight = bnb.dequantized(layer)
        view = LayerView(record.layer, "linear4bit", weight, bias, settings.shape, transposed=False)
        delta = low_rank_delta(view, list(record.adapters), [-c for c in record.coefficients])
        new_bias = merged_bias(view, list(record.adapters), record.coefficients, sign=-1.0)
        restored = engine.fuse_matrix(
            weight, delta, layer=record.layer, weight_shape=settings.shape, keep_correction=False
        ).merged
        assert restored is not None
        packed, state = bnb.quantize(restored, settings)
        bnb.commit(layer, packed, state)
        if new_bias is not None and bias is not None:
            bias.detach().copy_(new_bias)


def _report(
    weight: torch.Tensor,
    ideal: torch.Tensor,
    packed: torch.Tensor,
    state: Any,
    delta: engine.LowRankDelta,
    settings: bnb.Settings4bit,
) -> dict[str, Any]:
    requantized = bnb.dequantize_plain(packed, state)
    bound = blockwise_bound(
        ideal, settings.blocksize, settings.quant_type, bnb.stored_absmax(state)
    )
    error = (requantized.to(torch.float64) - ideal.to(torch.float64)).abs().reshape(-1)
    worst = (
        float((error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max())
        if error.numel()
        else 0.0
    )
    changed = (requantized != weight).reshape(-1)
    padding = (-changed.numel()) % settings.blocksize
    changed_blocks = (
        torch.nn.functional.pad(changed, (0, padding)).reshape(-1, settings.blocksize).any(dim=1)
    )
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(REPORT_INPUTS, settings.shape[1], generator=generator)
    adapter_effect = (inputs @ delta.right.T) @ delta.left.T
    lost = inputs @ (requantized - weight).T - adapter_effect
    effect_norm = float(torch.linalg.vector_norm(adapter_effect))
    output_error = (
        float(torch.linalg.vector_norm(lost)) / effect_norm if effect_norm > 0 else math.inf
    )
    return {
        "worst_error_of_bound": worst,
        "blocks": int(changed_blocks.numel()),
        "blocks_changed": int(changed_blocks.sum()),
        "elements_changed": int(changed.sum()),
        "output_error": output_error,
    }


def refuse_8bit(layer: Any, name: str | None) -> None:
    raise UnsupportedLayerError(
        f"layer {name or type(layer).__name__!r} is a bitsandbytes {type(layer).__name__}: "
        f"8-bit layers are not fused yet (4-bit Linear4bit layers are)"
    )
