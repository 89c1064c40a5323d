"""Guarded, all-or-nothing fuse and unfuse of LoRA adapters into one layer."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from safemerge.errors import RestoreError, UnsupportedLayerError
from safemerge.merge import engine
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.numerics import SUPPORTED_DTYPES
from safemerge.merge.record import FuseRecord
from safemerge.merge.request import Adapters, check_request, low_rank_delta, merged_bias, weighted
from safemerge.merge.request import coefficients as coefficients_of
from safemerge.merge.view import LayerView, view_layer
from safemerge.quant import bnb, quantized
from safemerge.quant.quantized import QuantizedFuseRecord


def fuse(
    layer: nn.Module,
    adapters: Adapters,
    *,
    scale: float = 1.0,
    name: str | None = None,
    exact_unfuse: bool = True,
) -> FuseRecord | QuantizedFuseRecord:
    """Fuse one or several LoRA adapters into ``layer``'s weight (and bias), in place.

    The merge is computed in float32 whatever the weight's dtype:
    ``W' = cast(W + sum(weight_i * adapter_i.scale * scale * B_i @ A_i))``, with DoRA's
    per-output renormalisation when the adapter has a magnitude. Nothing changes unless
    every element of the result is finite in the weight's dtype.

    Args:
        layer: ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d`` (groups=1), a
            module with a 2-D weight stored ``(in, out)`` (adapter ``fan_in_fan_out=True``),
            or a bitsandbytes ``Linear4bit`` (NF4/FP4, any blocksize, nested or not) or
            ``Linear8bitLt``.
        adapters: a :class:`LoraAdapter`, or a list of adapters or ``(adapter, weight)``.
        scale: overall multiplier (PEFT's ``lora_scale``); any finite value, 0 included.
        name: the layer's name, for messages and the record.
        exact_unfuse: keep the compact correction that lets :func:`unfuse` restore every
            bit (about a quarter byte per weight element; for a bitsandbytes layer, its
            packed bytes).

    Returns:
        A :class:`FuseRecord` (a :class:`QuantizedFuseRecord` for a bitsandbytes layer) for
        :func:`unfuse` and for reports.

    Raises:
        NonFiniteMergeError: the weight or bias would not be finite in its dtype.
        AdapterConfigError: an adapter does not fit the layer.
        UnsupportedLayerError: the layer kind or dtype is not supported.
    """
    if bnb.is_bnb_layer(layer):
        return quantized.fuse_quantized(
            layer, weighted(adapters), scale=scale, name=name, keep_original=exact_unfuse
        )
    return _fuse_view(view_layer(layer, name), adapters, scale=scale, exact_unfuse=exact_unfuse)


def fuse_weight(
    weight: torch.Tensor,
    adapters: Adapters,
    *,
    scale: float = 1.0,
    name: str = "weight",
    exact_unfuse: bool = True,
) -> FuseRecord:
    """:func:`fuse` for a bare weight tensor: ``(out, in)``, or ``(in, out)`` when the
    adapters have ``fan_in_fan_out=True``. The tensor is updated in place (a Parameter
    or a plain tensor alike) with the same guard, atomicity and exact unfuse.
    """
    return _fuse_view(
        _weight_view(weight, adapters, name), adapters, scale=scale, exact_unfuse=exact_unfuse
    )


def unfuse_weight(weight: torch.Tensor, record: FuseRecord, *, exact: bool = True) -> None:
    """:func:`unfuse` for a weight fused with :func:`fuse_weight`."""
    view = LayerView(
        record.layer,
        record.kind,
        weight,
        None,
        _matrix_shape(weight),
        record.kind == "fan_in_fan_out",
    )
    _unfuse_view(view, record, exact=exact)


def _weight_view(weight: torch.Tensor, adapters: Adapters, name: str) -> LayerView:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise UnsupportedLayerError(
            f"{name!r}: fuse_weight takes a 2-D weight tensor; got "
            f"{type(weight).__name__ if not isinstance(weight, torch.Tensor) else f'shape {tuple(weight.shape)}'}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedLayerError(
            f"{name!r} has dtype {weight.dtype}; supported: {SUPPORTED_DTYPES}"
        )
    transposed = any(adapter.fan_in_fan_out for adapter, _ in weighted(adapters))
    kind = "fan_in_fan_out" if transposed else "linear"
    return LayerView(name, kind, weight, None, _matrix_shape(weight), transposed)


def _matrix_shape(weight: torch.Tensor) -> tuple[int, int]:
    return int(weight.shape[0]), int(weight.shape[1])


@dataclass(frozen=True)
class FusedTensors:
    """:func:`fused_tensors`'s result.

    Attributes:
        weight: the fused weight, a new tensor of the layer's weight's shape and dtype.
        bias: the fused bias, a new tensor, where a LoRA bias changes it; else None.
        record: the fuse's record (without a correction: the layer keeps the original).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    record: FuseRecord


def fused_tensors(
    layer: nn.Module, adapters: Adapters, *, scale: float = 1.0, name: str | None = None
) -> FusedTensors:
    """:func:`fuse` into new tensors, leaving ``layer`` as it is.

    The same guarded arithmetic as :func:`fuse`, bit for bit, written into a new weight
    (and bias) instead of the layer's own: where the original stays needed anyway (a fuse
    from a file, which reads the weight once and checks the result against it), this
    saves the copy a rollback or a check would otherwise take, and the correction.

    Raises:
        NonFiniteMergeError, AdapterConfigError, UnsupportedLayerError: as :func:`fuse`
            (a bitsandbytes layer is not supported here).
    """
    if bnb.is_bnb_layer(layer):
        raise UnsupportedLayerError(
            f"{name or type(layer).__name__!r}: fused_tensors does not take a bitsandbytes "
            f"layer; use fuse"
        )
    view = view_layer(layer, name)
    record, merged, new_bias = _fused_matrix(view, adapters, scale=scale, in_place=False)
    assert merged is not None
    return FusedTensors(merged.reshape(view.weight.shape), new_bias, record)


def fuse_in_buffer(
    layer: nn.Module,
    adapters: Adapters,
    *,
    buffer: torch.Tensor,
    scale: float = 1.0,
    name: str | None = None,
) -> FuseRecord | QuantizedFuseRecord:
    """:func:`fuse` with ``exact_unfuse=False``, the merge computed whole in ``buffer``,
    then copied into the layer.

    In place, a fuse journals every block's correction, so that a failure midway can be
    rolled back: on a CPU that journal (an unfuse, a code and maybe an escape per element)
    costs nearly as much as the merge itself. Computed in ``buffer`` first, the layer
    changes only in the final copy, which costs a fraction of that.
    A caller merging many layers passes the same buffer each time, so that its pages are
    touched once. A bitsandbytes layer, or a weight off the CPU, is fused as :func:`fuse`
    does, without ``buffer``.

    Args:
        buffer: a flat, contiguous ``uint8`` tensor on the CPU, at least as many bytes
            as the layer's weight.

    Raises:
        ValueError: ``buffer`` is not such a tensor, or too small.
        NonFiniteMergeError, AdapterConfigError, UnsupportedLayerError: as :func:`fuse`;
            the layer is unchanged.
    """
    size = buffer_bytes(layer)
    if size == 0:
        return fuse(layer, adapters, scale=scale, name=name, exact_unfuse=False)
    view = view_layer(layer, name)
    rows, columns = view.matrix_shape
    if not (
        buffer.dtype == torch.uint8
        and buffer.dim() == 1
        and buffer.is_contiguous()
        and buffer.device.type == "cpu"
        and buffer.numel() >= size
    ):
        raise ValueError(
            f"{view.name!r}: fuse_in_buffer needs a flat contiguous uint8 CPU buffer of at "
            f"least {size} bytes; got {buffer.dtype} {tuple(buffer.shape)} on {buffer.device}"
        )
    out = buffer[:size].view(view.weight.dtype).view(rows, columns)
    record, merged, new_bias = _fused_matrix(view, adapters, scale=scale, in_place=False, out=out)
    with torch.no_grad():
        _commit(view, merged, new_bias)
    return record


def buffer_bytes(layer: nn.Module) -> int:
    """The bytes of buffer :func:`fuse_in_buffer` computes ``layer``'s merge in: its
    weight's; 0 where it fuses without one (a bitsandbytes layer, a weight off the CPU)."""
    if bnb.is_bnb_layer(layer):
        return 0
    weight = layer.weight
    return weight.numel() * weight.element_size() if weight.device.type == "cpu" else 0


def _fuse_view(
    view: LayerView, adapters: Adapters, *, scale: float, exact_unfuse: bool
) -> FuseRecord:
    # In place whenever M is a view of the weight: without exact_unfuse, the engine
    # journals the blocks for a rollback and drops the journal at the end.
    record, merged, new_bias = _fused_matrix(
        view, adapters, scale=scale, in_place=True, exact_unfuse=exact_unfuse
    )
    with torch.no_grad():
        _commit(view, merged, new_bias)
    return record


def _fused_matrix(
    view: LayerView,
    adapters: Adapters,
    *,
    scale: float,
    in_place: bool,
    exact_unfuse: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[FuseRecord, torch.Tensor | None, torch.Tensor | None]:
    """The fuse's record, the merged M for the caller to commit (None when the merge was
    written into the weight itself: ``in_place`` asked and M a view of it; else a new
    tensor, or ``out``), and the merged bias to commit (None when unchanged)."""
    started = time.perf_counter()
    pairs = weighted(adapters)
    check_request(view, pairs, scale)
    coefficients = coefficients_of(pairs, scale)
    with torch.no_grad():
        delta = low_rank_delta(view, pairs, coefficients)
        factor = _dora_factor(view, pairs, delta)
        new_bias = merged_bias(view, pairs, coefficients, sign=1.0)
        matrix, in_place = _writable_matrix(view, in_place)
        fused = engine.fuse_matrix(
            matrix,
            delta,
            layer=view.name,
            weight_shape=view.weight.shape,
            factor=factor,
            keep_correction=exact_unfuse,
            in_place=in_place,
            out=out,
        )
        original_bias = (
            None if new_bias is None or view.bias is None else view.bias.detach().cpu().clone()
        )
    record = FuseRecord(
        layer=view.name,
        kind=view.kind,
        dtype=view.weight.dtype,
        shape=tuple(view.weight.shape),
        adapters=tuple(pairs),
        scale=scale,
        coefficients=coefficients,
        correction=fused.correction,
        original_bias=original_bias,
        dora_factor=None if factor is None else factor.values.cpu(),
        num_threads=torch.get_num_threads(),
        block_rows=fused.block_rows,
        fused_fingerprint=fused.fingerprint,
        seconds=time.perf_counter() - started,
    )
    return record, None if in_place else fused.merged, new_bias


def unfuse(
    layer: nn.Module, record: FuseRecord | QuantizedFuseRecord, *, exact: bool = True
) -> None:
    """Undo the fuse that produced ``record``, in place.

    With ``exact=True`` every bit of the weight and bias is restored. With
    ``exact=False`` the same float32 delta is subtracted (and DoRA's factor divided out):
    the arithmetic inverse, which in low precision is off by an ulp at many elements.
    Fuses of one layer must be undone in reverse order.

    Raises:
        RestoreError: the layer is not the one fused, changed since, or the record kept
            no correction and ``exact=True`` was asked.
        NonFiniteMergeError: an arithmetic unfuse would leave a non-finite element.
    """
    if isinstance(record, QuantizedFuseRecord):
        quantized.unfuse_quantized(layer, record, exact=exact)
        return
    _unfuse_view(view_layer(layer, record.layer), record, exact=exact)


def _unfuse_view(view: LayerView, record: FuseRecord, *, exact: bool) -> None:
    _check_record(view, record, exact)
    with torch.no_grad():
        delta = low_rank_delta(view, list(record.adapters), record.coefficients)
        factor = None
        if record.dora_factor is not None:
            along_rows = not view.transposed
            values = record.dora_factor.to(view.weight.device)
            factor = engine.OutputFactor(values, along_rows)
        matrix, in_place = _writable_matrix(view, exact)
        with _threads_of(record):
            restored = engine.unfuse_matrix(
                matrix,
                delta,
                layer=view.name,
                weight_shape=view.weight.shape,
                block_rows=record.block_rows,
                factor=factor,
                correction=record.correction if exact else None,
                in_place=in_place,
            )
        if exact and record.original_bias is not None:
            new_bias: torch.Tensor | None = record.original_bias
        else:
            new_bias = merged_bias(view, list(record.adapters), record.coefficients, sign=-1.0)
        _commit(view, restored, new_bias)


def _threads_of(record: FuseRecord) -> contextlib.AbstractContextManager[None]:
    """The threads an unfuse repeats its fuse's products with.

    A product on torch's matmul (float8, DoRA, a GPU) may round with the thread count that
    computed it. A fuse on one torch thread (the record's count, as under
    :func:`engine.blocks_on`) computed every product single-threaded, whatever its block
    threads: the unfuse may share its blocks out to the threads it has, torch on one. Else
    it repeats torch's count (which decides the block threads too).
    """
    if record.num_threads == 1:
        return engine.blocks_on(engine.block_threads())
    return engine.pinned_threads(record.num_threads)


def _dora_factor(
    view: LayerView, pairs: list[tuple[LoraAdapter, float]], delta: engine.LowRankDelta
) -> engine.OutputFactor | None:
    magnitude = pairs[0][0].magnitude
    if magnitude is None:
        return None
    along_rows = not view.transposed
    norms = engine.output_norms(view.matrix, delta, along_rows=along_rows)
    magnitude64 = magnitude.detach().to(device=norms.device, dtype=torch.float64).reshape(-1)
    return engine.OutputFactor(magnitude64 / norms, along_rows)


def _writable_matrix(view: LayerView, in_place: bool) -> tuple[torch.Tensor, bool]:
    """The weight as M, and whether a fuse or unfuse writes into it directly: when asked
    (``in_place``) and M is a view of the weight's own storage (a conv weight in
    channels_last is not). An unfuse asks only when exact (the correction is what makes a
    failure midway reversible); a fuse journals its blocks for that.
    """
    try:
        matrix = view.weight.detach().view(view.matrix_shape)
    except RuntimeError:
        return view.matrix, False
    return matrix, in_place


def _commit(view: LayerView, matrix: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    # Everything is computed and checked before this point; these copies cannot fail on
    # shape, dtype or device, so the layer changes whole or not at all.
    if matrix is not None:
        view.weight.detach().copy_(matrix.reshape(view.weight.shape))
    if bias is not None and view.bias is not None:
        view.bias.detach().copy_(bias)


def _check_record(view: LayerView, record: FuseRecord, exact: bool) -> None:
    if (view.kind, tuple(view.weight.shape), view.weight.dtype) != (
        record.kind,
        record.shape,
        record.dtype,
    ):
        raise RestoreError(
            f"the record is for a {record.kind} layer {record.layer!r} with a {record.dtype} "
            f"weight of shape {record.shape}, but this layer is a {view.kind} with a "
            f"{view.weight.dtype} weight of shape {tuple(view.weight.shape)}"
        )
    if exact and record.correction is None:
        raise RestoreError(
            f"layer {record.layer!r} was fused with exact_unfuse=False, so no correction was "
            f"kept: call unfuse(..., exact=False) for the arithmetic inverse"
        )
    if engine.fingerprint(view.weight) != record.fused_fingerprint:
        raise RestoreError(
            f"layer {record.layer!r} changed since this record's fuse (another fuse, an unfuse, "
            f"or a training step): undo fuses in reverse order, each with its own record"
        )
