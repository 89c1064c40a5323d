"""Guarded, all-or-nothing fuse into bitsandbytes layers: dequantize, merge, requantize.

The merge itself is the float path's (float32, guarded) on the weight the layer holds;
the result is requantized with the layer's own settings (4-bit: quant type, blocksize,
nesting, storage; 8-bit: row-wise int8 through float16). Every element is checked
against its own block's (or row's) rounding bound, and what was changed is reported:
requantization can swallow small deltas whole. Unfuse restores the original bytes and
quantization state (half a byte per weight for 4-bit, kept on the CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from safemerge.errors import RestoreError, UnsupportedLayerError
from safemerge.merge import engine
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.request import check_request, low_rank_delta, merged_bias
from safemerge.merge.request import coefficients as coefficients_of
from safemerge.merge.view import LayerView
from safemerge.quant import bnb
from safemerge.quant.grid import blocks_of

#: Random inputs used to report how much the requantized layer's output moved.
REPORT_INPUTS = 16
#: Elements the report checks at a time (a slice of rows; see ``_report``).
REPORT_SLICE = 1 << 16


@dataclass(frozen=True, eq=False)
class QuantizedFuseRecord:
    """What a fuse into a 4-bit layer did; pass it to :func:`safemerge.unfuse`.

    Attributes:
        layer, kind, shape: the layer (``kind`` is ``"linear4bit"`` or ``"linear8bitlt"``)
            and its weight's shape.
        settings: the quantization settings, kept through the fuse (4-bit: quant_type,
            blocksize, nested; 8-bit: threshold).
        adapters, scale, coefficients: as in :class:`safemerge.FuseRecord`.
        original: every byte and state object of the quantized weight before the fuse;
            None when the fuse was asked not to keep it (no exact unfuse).
        original_bias: a copy of the bias before the fuse, when the fuse changed it.
        fused_fingerprint: checksum of the quantized weight after the fuse, to detect
            later changes (another fuse) before an exact unfuse puts old bytes back.
        worst_error_of_bound: the largest ``|dequantized - ideal| / bound`` over all
            elements, ``ideal`` the float32 merge, ``bound`` the element's block bound.
        blocks: number of scale blocks in the weight (4-bit absmax blocks, 8-bit rows).
        blocks_changed: blocks whose values the fuse changed at all.
        elements_changed: elements whose dequantized value changed.
        output_error: ``||x (W_q' - W_q)^T - x delta^T|| / ||x delta^T||`` over random
            inputs ``x``: how far the layer's output change is from the adapter's effect
            (0: kept exactly; 1: lost whole, as when the delta vanishes in requantization).
        seconds: wall time of the fuse.
    """

    layer: str
    kind: str
    shape: tuple[int, int]
    settings: dict[str, Any]
    adapters: tuple[tuple[LoraAdapter, float], ...]
    scale: float
    coefficients: tuple[float, ...]
    original: bnb.Snapshot | None
    weight_nbytes: int
    original_bias: torch.Tensor | None
    fused_fingerprint: int
    worst_error_of_bound: float
    blocks: int
    blocks_changed: int
    elements_changed: int
    output_error: float
    seconds: float

    @property
    def exact(self) -> bool:
        """Whether :func:`safemerge.unfuse` can restore every byte."""
        return self.original is not None

    @property
    def nbytes(self) -> int:
        """Bytes kept to undo the fuse exactly: packed weight, absmax, original bias."""
        bias = (
            0
            if self.original_bias is None
            else self.original_bias.numel() * self.original_bias.element_size()
        )
        return (0 if self.original is None else self.original.nbytes) + bias

    def summary(self) -> str:
        settings = ", ".join(f"{key} {value}" for key, value in self.settings.items())
        return (
            f"{self.layer} ({self.kind}: {settings}): {self.blocks_changed:,} of {self.blocks:,} "
            f"blocks changed ({self.elements_changed:,} elements); worst error "
            f"{self.worst_error_of_bound:.3f} of its block bound; output error "
            f"{self.output_error:.3g} of the adapter's effect; {self.seconds * 1e3:.1f} ms"
        )


def fuse_quantized(
    layer: Any,
    pairs: list[tuple[LoraAdapter, float]],
    *,
    scale: float,
    name: str | None,
    keep_original: bool = True,
) -> QuantizedFuseRecord:
    """Fuse into a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``; see :func:`safemerge.fuse`.

    ``keep_original`` keeps the packed bytes for an exact unfuse (half a byte per 4-bit
    weight); without it only the arithmetic unfuse remains.
    """
    started = time.perf_counter()
    label = name or type(layer).__name__
    quantized_format = _format_of(layer, label)
    if any(adapter.is_dora for adapter, _ in pairs):
        raise UnsupportedLayerError(
            f"layer {label!r}: DoRA adapters are not fused into quantized layers"
        )
    original = quantized_format.snapshot() if keep_original else None
    weight_nbytes = quantized_format.data().numel() * quantized_format.data().element_size()
    # Dequantizing, requantizing and the report are whole-weight torch ops: they take the
    # threads the caller gave the blocks, if it pinned torch to one (engine.blocks_on).
    with torch.no_grad(), engine.pinned_threads(engine.block_threads()):
        weight = quantized_format.read()
        view = _view(layer, label, weight, quantized_format)
        check_request(view, pairs, scale)
        coefficients = coefficients_of(pairs, scale)
        delta = low_rank_delta(view, pairs, coefficients)
        new_bias = merged_bias(view, pairs, coefficients, sign=1.0)
        merged = _float32_merge(weight, delta, label)
        result = quantized_format.quantize(merged)
        report = _report(weight, merged, result, delta, quantized_format.group)
        original_bias = (
            None if new_bias is None or view.bias is None else view.bias.detach().cpu().clone()
        )
        # Everything is computed and checked; installing is attribute assignments.
        quantized_format.install(result.attributes)
        if new_bias is not None and view.bias is not None:
            view.bias.detach().copy_(new_bias)
    return QuantizedFuseRecord(
        fused_fingerprint=engine.fingerprint(quantized_format.data()),
        layer=label,
        kind=quantized_format.kind,
        shape=quantized_format.shape,
        settings=quantized_format.describe(),
        adapters=tuple(pairs),
        scale=scale,
        coefficients=coefficients,
        original=original,
        weight_nbytes=int(weight_nbytes),
        original_bias=original_bias,
        seconds=time.perf_counter() - started,
        **report,
    )


def quantization_bound(
    layer: Any, ideal: torch.Tensor, *, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight a bitsandbytes layer holds and how far it may be from ``ideal``.

    Returns ``(values, bound)``, both ``(out, in)``: the layer's weight dequantized to
    float32, and per element the bound on ``|quantize(ideal) - ideal|`` with the layer's
    own settings (4-bit: ``h * s'`` of the element's block plus the nested absmax's
    error; int8: ``SCB'/254 + |fp16(y) - y|`` of its row). A layer holding the
    quantization of ``ideal`` has ``|values - ideal| <= bound`` everywhere.

    Raises:
        UnsupportedLayerError: ``layer`` is not a Linear4bit or Linear8bitLt.
        NonFiniteMergeError: ``ideal`` does not fit the quantized format.
    """
    label = name or type(layer).__name__
    quantized_format = _format_of(layer, label)
    with torch.no_grad():
        values = quantized_format.read()
        bound = quantized_format.quantize(ideal.detach().to(values.device, torch.float32)).bound
    return values, bound


def _format_of(layer: Any, label: str) -> bnb.QuantizedFormat:
    quantized_format = bnb.format_of(layer, label)
    if quantized_format is None:
        raise UnsupportedLayerError(
            f"layer {label!r} is a bitsandbytes {type(layer).__name__}, which safemerge does not "
            f"fuse; supported: Linear4bit (NF4/FP4) and Linear8bitLt"
        )
    return quantized_format


def unfuse_quantized(layer: Any, record: QuantizedFuseRecord, *, exact: bool = True) -> None:
    """Undo :func:`fuse_quantized`: the original bytes back, or (``exact=False``) subtract
    the same delta and requantize (not an inverse: requantization rounds again)."""
    quantized_format = bnb.format_of(layer, record.layer)
    if quantized_format is None or (quantized_format.kind, quantized_format.shape) != (
        record.kind,
        record.shape,
    ):
        raise RestoreError(
            f"the record is for a {record.kind} layer {record.layer!r} of shape {record.shape}, "
            f"not this {type(layer).__name__}"
        )
    if engine.fingerprint(quantized_format.data()) != record.fused_fingerprint:
        raise RestoreError(
            f"layer {record.layer!r} changed since this record's fuse (another fuse or "
            f"unfuse): undo fuses in reverse order, each with its own record"
        )
    if exact and record.original is None:
        raise RestoreError(
            f"layer {record.layer!r} was fused without keeping its original bytes "
            f"(exact_unfuse=False): call unfuse(..., exact=False) to subtract and requantize"
        )
    with torch.no_grad():
        if exact:
            assert record.original is not None
            quantized_format.restore(record.original)
            bias = getattr(layer, "bias", None)
            if record.original_bias is not None and isinstance(bias, torch.Tensor):
                bias.detach().copy_(record.original_bias)
            return
        weight = quantized_format.read()
        view = _view(layer, record.layer, weight, quantized_format)
        delta = low_rank_delta(view, list(record.adapters), [-c for c in record.coefficients])
        new_bias = merged_bias(view, list(record.adapters), record.coefficients, sign=-1.0)
        result = quantized_format.quantize(_float32_merge(weight, delta, record.layer))
        quantized_format.install(result.attributes)
        if new_bias is not None and view.bias is not None:
            view.bias.detach().copy_(new_bias)


def _view(
    layer: Any, label: str, weight: torch.Tensor, quantized_format: bnb.QuantizedFormat
) -> LayerView:
    bias = layer.bias if isinstance(getattr(layer, "bias", None), torch.Tensor) else None
    return LayerView(
        label, quantized_format.kind, weight, bias, quantized_format.shape, transposed=False
    )


def _float32_merge(weight: torch.Tensor, delta: engine.LowRankDelta, label: str) -> torch.Tensor:
    merged = engine.fuse_matrix(
        weight, delta, layer=label, weight_shape=weight.shape, keep_correction=False
    ).merged
    assert merged is not None  # not in place: the merge is a new tensor
    return merged


def _report(
    weight: torch.Tensor,
    merged: torch.Tensor,
    result: bnb.Quantized,
    delta: engine.LowRankDelta,
    group: int,
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(REPORT_INPUTS, weight.shape[1], generator=generator).to(weight.device)
    adapter_effect = (inputs @ delta.right.T) @ delta.left.T
    moved = torch.empty_like(adapter_effect)  # inputs @ (values - weight).T
    worst, blocks_changed, elements_changed = 0.0, 0, 0
    # In slices of whole groups that stay in cache: each pass over a slice is cheap,
    # over the whole weight it is a trip to memory (most of a 4-bit fuse's time).
    for rows in _row_slices(weight.shape, group):
        change = result.values[rows] - weight[rows]
        moved[:, rows] = inputs @ change.T
        elements_changed += int(torch.count_nonzero(change))
        # A block changed where its largest |change| is not 0 (faster than a bool any).
        largest = blocks_of(change.reshape(-1).abs(), group).amax(dim=1)
        blocks_changed += int(torch.count_nonzero(largest))
        worst = max(worst, result.worst_ratio(merged[rows], rows.start * weight.shape[1]))
    distortion = moved - adapter_effect
    effect_norm = float(torch.linalg.vector_norm(adapter_effect))
    output_error = (
        float(torch.linalg.vector_norm(distortion)) / effect_norm if effect_norm > 0 else math.inf
    )
    return {
        "worst_error_of_bound": worst,
        "blocks": -(-weight.numel() // group),
        "blocks_changed": blocks_changed,
        "elements_changed": elements_changed,
        "output_error": output_error,
    }


def _row_slices(shape: torch.Size, group: int) -> list[slice]:
    """Row ranges of about ``REPORT_SLICE`` elements, each starting on a group boundary."""
    rows, columns = shape
    aligned = group // math.gcd(group, max(columns, 1))  # rows that hold whole groups
    step = max(aligned, REPORT_SLICE // max(columns, 1) // aligned * aligned)
    return [slice(first, min(first + step, rows)) for first in range(0, rows, step)] or [
        slice(0, 0)
    ]
