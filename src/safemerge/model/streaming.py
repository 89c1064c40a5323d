"""Fuse adapter files into a safetensors model or a diffusers pipeline, disk to disk.

:func:`fuse_files` opens the base lazily, makes every check that can be made up front
before anything is written, then reads each tensor, casts it, fuses it if adapted,
checks it against its error bound, writes and drops it; the output appears whole,
through :func:`safemerge.io.writer.write_model` (a model) or
:func:`safemerge.io.pipeline_writer.write_pipeline` (a pipeline), or not at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import torch
from torch import nn

from safemerge.errors import (
    AdapterConfigError,
    ModelFuseError,
    ModelWriteError,
    SafemergeError,
    UnsupportedLayerError,
)
from safemerge.io import writer
from safemerge.io.adapter_formats import AdapterSet, load_adapter
from safemerge.io.checkpoint import Checkpoint, open_checkpoint
from safemerge.io.phases import PhaseTimes
from safemerge.io.pipeline_dir import is_pipeline_dir, open_pipeline, split_by_component
from safemerge.io.pipeline_writer import ComponentOutput, write_pipeline
from safemerge.io.shard_writer import tensor_nbytes
from safemerge.layer import FusedTensors, fused_tensors
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.layer_check import BoundCheck
from safemerge.merge.request import check_request
from safemerge.merge.view import view_layer
from safemerge.model.fuse_arguments import (
    AdapterPaths,
    check_config,
    check_fuse_arguments,
    output_dtype,
)
from safemerge.model.idle_cores import FuseThreads
from safemerge.model.memory import release_free_heap
from safemerge.model.read_ahead import ReadAhead, read_tensor
from safemerge.model.report import BIAS, CAST, UNCHANGED, ModelFuseReport, TensorResult
from safemerge.model.transaction import (
    checked_against_bound,
    plan_error,
)

#: One planned output tensor: ``(name, shape, dtype)``.
_Plan: TypeAlias = list[tuple[str, tuple[int, ...], torch.dtype]]


#: After writing a tensor at least this large, freed heap memory is handed back.
_TRIM_BYTES = 1 << 20


def fuse_files(
    base: str | os.PathLike[str],
    adapters: AdapterPaths,
    output: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    shard_size: int = writer.DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: Callable[[TensorResult], None] | None = None,
) -> ModelFuseReport:
    """Fuse adapter files into a safetensors model, streaming from disk to a new directory.

    Everything that can be checked is checked before anything is written: the output
    path, the adapters' keys and shapes against the base, every layer's kind and
    options, the dtypes, the free disk space. Then each tensor is read, cast to
    ``dtype``, fused if adapted (its every element checked against its error bound),
    written, and dropped, so memory stays of the order of the largest tensor. The
    output is a new model directory that appears whole or not at all; the inputs are
    only read. The other files of a base directory (``config.json``, tokenizer
    files...) are copied beside the weights.

    A diffusers pipeline directory (``model_index.json``) as ``base`` is fused component
    by component, the same way: adapter keys name their component (``unet.``,
    ``text_encoder.``, kohya's ``lora_unet_``/``lora_te1_``...), every component an
    adapter touches (every one with weights, with ``dtype``) is written anew under its
    own weight file names, and every other file and folder is copied as it is; the
    output is a pipeline directory, whole or not at all.

    Args:
        base: a model directory (``model.safetensors``, or shards and their index), an
            index file, one ``.safetensors`` file (then no other file is copied), or a
            diffusers pipeline directory.
        adapters: adapter paths (PEFT directories, kohya or diffusers files), or
            ``(path, weight)`` pairs; several adapters on one layer are fused together.
        output: the model directory to create.
        scale: overall multiplier for every adapter.
        dtype: the output's floating-point dtype (every floating tensor is cast, and
            adapters are fused in it); None keeps each tensor's own dtype.
        shard_size: the largest shard, in bytes (a larger tensor gets its own shard).
        overwrite: replace an existing ``output``, once the new model is complete.
        progress: called with each tensor's :class:`TensorResult` once it is ready to
            write; an exception it raises aborts the fuse (nothing is written).

    Returns:
        The :class:`ModelFuseReport`.

    Raises:
        CheckpointError, AdapterFormatError, AdapterConfigError: an input cannot be read
            (the base's ``config.json`` included, if it has one), or an adapter does not
            fit the base.
        ModelFuseError: a layer cannot be fused as asked (all of them listed), or an
            unexpected error while fusing one (named).
        ModelWriteError: ``output`` exists, is an input, or there is no room for it.
        NonFiniteMergeError: a layer's merge would not be finite (the layer named).
        In every case nothing is left under ``output``.
    """
    started = time.perf_counter()
    phases = PhaseTimes()
    base_path = Path(base)
    output_path = Path(output)
    weighted_paths = check_fuse_arguments(
        base_path, adapters, output_path, scale=scale, dtype=dtype, overwrite=overwrite
    )
    if is_pipeline_dir(base_path):
        return _fuse_pipeline(
            base_path, weighted_paths, output_path, scale, dtype, shard_size, overwrite, progress
        )
    with open_checkpoint(base_path) as checkpoint:
        sets = [(load_adapter(path, base=checkpoint), weight) for path, weight in weighted_paths]
        plan = _plan(checkpoint, dtype)
        layers = file_layers(checkpoint, sets, scale, _dtypes(plan))
        copy_from = copy_source(base_path)
        if copy_from is not None:
            check_config(copy_from)
        copied = writer.files_to_copy(copy_from) if copy_from is not None else []
        _check_space(output_path, _plan_bytes(plan) + sum(path.stat().st_size for path in copied))
        metadata = provenance(checkpoint.metadata, sets, scale, dtype)
        results: list[TensorResult] = []

        def report(result: TensorResult) -> None:
            results.append(result)
            if progress is not None:
                progress(result)

        tensors = _fused_tensors(checkpoint, plan, layers, scale, report, phases)
        try:
            written = writer.write_model(
                output_path,
                tensors,
                plan=plan,
                shard_size=shard_size,
                metadata=metadata,
                copy_from=copy_from,
                overwrite=overwrite,
                phases=phases,
                background=True,  # _fused_tensors never touches a tensor it has yielded
            )
        except SafemergeError as error:
            error.add_note(f"fuse_files: nothing was written to {output_path}")
            raise
    return ModelFuseReport.on_disk(
        results,
        started=started,
        output=written.path,
        tensors_written=written.tensors,
        shard_count=written.shard_count,
        written_bytes=written.total_size,
        metadata=metadata,
        copied=written.copied,
        phases=phases,
    )


def _fuse_pipeline(
    base: Path,
    weighted_paths: Sequence[tuple[Path, float]],
    output: Path,
    scale: float,
    dtype: torch.dtype | None,
    shard_size: int,
    overwrite: bool,
    progress: Callable[[TensorResult], None] | None,
) -> ModelFuseReport:
    """:func:`fuse_files` for a diffusers pipeline directory: each component as a model."""
    started = time.perf_counter()
    phases = PhaseTimes()
    with ExitStack() as stack:
        pipeline = open_pipeline(base, stack)
        shapes, names = pipeline.shapes(), list(pipeline.components)
        sets = [
            (load_adapter(path, base=shapes, components=names), weight)
            for path, weight in weighted_paths
        ]
        split = [(split_by_component(adapter_set, pipeline), w) for adapter_set, w in sets]
        jobs = []  # (component, its adapters, plan, layers), every one checked before writing
        problems: list[tuple[str, str]] = []
        for component in pipeline:
            own = [
                (by_name[component.name], w) for by_name, w in split if component.name in by_name
            ]
            if not own and dtype is None:
                continue  # copied byte for byte
            plan = _plan(component.checkpoint, dtype)
            try:
                layers = file_layers(component.checkpoint, own, scale, _dtypes(plan))
            except ModelFuseError as error:
                problems += [(f"{component.name}.{name}", what) for name, what in error.problems]
                continue
            check_config(component.path)
            jobs.append((component, own, plan, layers))
        if problems:
            raise plan_error(problems, base, "nothing was written")
        rewritten = {component.name for component, *_ in jobs}
        copied_bytes = sum(
            path.stat().st_size
            for path in _files_under(base)
            if path.relative_to(base).parts[0] not in rewritten
            or not writer.is_weight_file(path.name)
        )
        _check_space(output, sum(_plan_bytes(plan) for *_, plan, _ in jobs) + copied_bytes)
        results: list[TensorResult] = []
        total = sum(len(plan) for *_, plan, _ in jobs)
        outputs = []
        for component, own, plan, layers in jobs:
            report = _component_report(component.name, len(results), total, results, progress)
            outputs.append(
                ComponentOutput(
                    component.name,
                    _fused_tensors(component.checkpoint, plan, layers, scale, report, phases),
                    plan,
                    provenance(component.checkpoint.metadata, own, scale, dtype),
                    component.weights_stem,
                )
            )
        try:
            written = write_pipeline(
                output,
                base,
                outputs,
                shard_size=shard_size,
                overwrite=overwrite,
                phases=phases,
                background=True,  # as in fuse_files
            )
        except SafemergeError as error:
            error.add_note(f"fuse_files: nothing was written to {output}")
            raise
    return ModelFuseReport.on_disk(
        results,
        started=started,
        output=written.path,
        tensors_written=written.tensors,
        shard_count=sum(len(files) for files in written.files.values()),
        written_bytes=written.total_size,
        metadata=provenance({}, sets, scale, dtype),
        copied=written.copied,
        phases=phases,
    )


def _component_report(
    component: str,
    before: int,
    total: int,
    results: list[TensorResult],
    progress: Callable[[TensorResult], None] | None,
) -> Callable[[TensorResult], None]:
    """Record a component's tensor results as the pipeline's: named ``"<component>.<name>"``
    and placed among all the pipeline's tensors written."""

    def report(result: TensorResult) -> None:
        placed = dataclasses.replace(
            result,
            name=f"{component}.{result.name}",
            position=before + result.position,
            total=total,
        )
        results.append(placed)
        if progress is not None:
            progress(placed)

    return report


def _files_under(folder: Path) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _files_under(entry)
        elif entry.is_file():
            yield entry


@dataclass(frozen=True)
class FileLayer:
    """An adapted weight of a checkpoint: its kind, adapters, and the bias a LoRA bias needs.

    Attributes:
        weight: the weight's name in the checkpoint.
        kind: the layer kind :func:`layer_around` builds (``"linear"``, ``"embedding"``...).
        pairs: ``(adapter, weight)`` of every adapter on it, in the order given.
        bias: the bias's name when a LoRA bias is fused into it, else None.
    """

    weight: str
    kind: str
    pairs: list[tuple[LoraAdapter, float]]
    bias: str | None


def _plan(checkpoint: Checkpoint, dtype: torch.dtype | None) -> _Plan:
    """Every tensor of ``checkpoint``, in order, with the shape and dtype it is written in."""
    return [
        (name, checkpoint.info(name).shape, output_dtype(checkpoint.info(name).dtype, dtype))
        for name in checkpoint.names
    ]


def _dtypes(plan: _Plan) -> dict[str, torch.dtype]:
    return {name: planned_dtype for name, _, planned_dtype in plan}


def _plan_bytes(plan: _Plan) -> int:
    return sum(tensor_nbytes(shape, dtype) for _, shape, dtype in plan)


def file_layers(
    checkpoint: Checkpoint,
    sets: Sequence[tuple[AdapterSet, float]],
    scale: float,
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, FileLayer]:
    """Every adapted weight, checked up front on meta tensors; a ModelFuseError lists misfits.

    ``dtypes`` maps every tensor's name to the dtype it is written (and fused) in.
    """
    kinds: dict[str, str] = {}
    requested: dict[str, list[tuple[LoraAdapter, float]]] = {}
    problems: list[tuple[str, str]] = []
    for adapter_set, weight in sets:
        for name, adapter in adapter_set.layers.items():
            kind = adapter_set.kinds.get(name, "linear")
            if kinds.setdefault(name, kind) != kind:
                problems.append(
                    (
                        name,
                        f"{adapter_set.path} adapts it as {kind}, another adapter as {kinds[name]}",
                    )
                )
            requested.setdefault(name, []).append((adapter, weight))
    layers: dict[str, FileLayer] = {}
    for name in checkpoint.names:
        if name not in requested:
            continue
        pairs = requested[name]
        bias_name = name.removesuffix("weight") + "bias"
        needs_bias = any(adapter.lora_bias is not None for adapter, _ in pairs)
        if needs_bias and bias_name not in checkpoint:
            problems.append((name, f"a LoRA bias needs the layer's bias {bias_name!r}"))
            continue
        bias = bias_name if needs_bias else None
        shape = checkpoint.info(name).shape
        weight_meta = torch.empty(shape, dtype=dtypes[name], device="meta")
        bias_meta = (
            None
            if bias is None
            else torch.empty(checkpoint.info(bias).shape, dtype=dtypes[bias], device="meta")
        )
        try:
            layer = layer_around(kinds[name], weight_meta, bias_meta)
            check_request(view_layer(layer, name), pairs, scale)
        except (AdapterConfigError, UnsupportedLayerError) as error:
            problems.append((name, str(error)))
            continue
        layers[name] = FileLayer(name, kinds[name], pairs, bias)
    if problems:
        raise plan_error(problems, checkpoint.path, "nothing was written")
    return layers


class _StoredTransposed(nn.Module):
    """A matmul layer storing its weight ``(in, out)`` (GPT-2's Conv1D), for the fuse."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias


def layer_around(kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module of ``kind`` around a bare weight (and bias), sharing their storage."""
    weight_parameter = nn.Parameter(weight, requires_grad=False)
    bias_parameter = None if bias is None else nn.Parameter(bias, requires_grad=False)
    layer: nn.Module
    with torch.device("meta"):  # the throwaway initial parameters cost nothing
        if kind == "linear":
            layer = nn.Linear(1, 1, bias=False)
        elif kind == "embedding":
            layer = nn.Embedding(1, 1)
        elif kind in ("conv1d", "conv2d", "conv3d"):
            conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
            layer = conv(1, 1, 1, bias=False)
        elif kind == "fan_in_fan_out":
            return _StoredTransposed(weight_parameter, bias_parameter)
        else:
            raise UnsupportedLayerError(f"layer kind {kind!r} cannot be fused from a file")
    layer.weight = weight_parameter
    if bias_parameter is not None:
        layer.bias = bias_parameter
    return layer


def copy_source(base: Path) -> Path | None:
    """The directory whose other files go beside the output's weights: the base's (a
    directory or an index's), or None for a lone ``.safetensors`` file."""
    if base.is_dir():
        return base
    if base.name.endswith(".safetensors.index.json"):
        return base.parent
    return None


def _check_space(output: Path, needed: int) -> None:
    existing = output.absolute().parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ModelWriteError(
            f"not enough disk space for {output}: the merged model needs about "
            f"{needed / 2**30:.2f} GiB but {existing} has {free / 2**30:.2f} GiB free; free "
            f"some space or write elsewhere",
            path=output,
            reason="disk-space",
        )


def provenance(
    base_metadata: Mapping[str, str],
    sets: Sequence[tuple[AdapterSet, float]],
    scale: float,
    dtype: torch.dtype | None,
) -> dict[str, str]:
    """The base's safetensors metadata, plus what safemerge fused into it."""
    from safemerge._version import __version__

    adapters = [
        {
            "path": adapter_set.path.name,
            "digest": f"sha256:{adapter_set.digest}",
            "format": adapter_set.format,
            "weight": weight,
            "layers": len(adapter_set.layers),
        }
        for adapter_set, weight in sets
    ]
    return {
        **base_metadata,
        "format": "pt",
        "safemerge_version": __version__,
        "safemerge_adapters": json.dumps(adapters),
        "safemerge_scale": repr(float(scale)),
        "safemerge_dtype": "keep" if dtype is None else str(dtype).removeprefix("torch."),
    }


def _fused_tensors(
    checkpoint: Checkpoint,
    plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    layers: Mapping[str, FileLayer],
    scale: float,
    report: Callable[[TensorResult], None],
    phases: PhaseTimes,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor in plan order: read, cast, fused if adapted; its result reported."""
    by_bias = {layer.bias: layer for layer in layers.values() if layer.bias is not None}
    dtypes = {name: dtype for name, _, dtype in plan}
    done: dict[str, tuple[torch.Tensor, TensorResult]] = {}
    total = len(plan)
    with ReadAhead(checkpoint, plan) as read_ahead, FuseThreads() as threads:
        for position, (name, shape, dtype) in enumerate(plan, start=1):
            threads.refresh()
            started = time.perf_counter()
            if name not in done:
                layer = layers.get(name) or by_bias.get(name)
                if layer is None:
                    with phases.timing("read"):
                        tensor = read_ahead.read(name, dtype)
                    kind = UNCHANGED if tensor.dtype == checkpoint.info(name).dtype else CAST
                    result = TensorResult(name, kind, shape, dtype, None, 0.0)
                    done[name] = (tensor, result)
                else:
                    done.update(
                        fuse_file_layer(
                            checkpoint, layer, scale, dtypes, phases=phases, read=read_ahead.read
                        )
                    )
            tensor, result = done.pop(name)
            report(_placed(result, position, total, time.perf_counter() - started))
            yield name, tensor
            del tensor
            if tensor_nbytes(shape, dtype) >= _TRIM_BYTES:
                release_free_heap()


def _placed(result: TensorResult, position: int, total: int, seconds: float) -> TensorResult:
    """``result`` at its place in the output, timed by the loop that produced it.

    The time replaces whatever the result carried: a layer's weight and bias are read and
    fused in one step, timed once here (the tensor handed over later takes no time).
    """
    return dataclasses.replace(result, seconds=seconds, position=position, total=total)


def fuse_file_layer(
    checkpoint: Checkpoint,
    file_layer: FileLayer,
    scale: float,
    dtypes: Mapping[str, torch.dtype],
    *,
    phases: PhaseTimes | None = None,
    read: Callable[[str, torch.dtype], torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, TensorResult]]:
    """Read one adapted layer (weight, and bias when a LoRA bias needs it), fuse and check it.

    The results' times are left at zero: :func:`_fused_tensors` times the whole step.
    ``phases`` gets the time spent reading, fusing and checking; ``read(name, dtype)``
    reads the tensors (:func:`read_tensor` on ``checkpoint`` by default).
    """
    phases = phases or PhaseTimes()
    if read is None:
        read = functools.partial(read_tensor, checkpoint)
    name = file_layer.weight
    with phases.timing("read"):
        weight = read(name, dtypes[name])
        bias = None if file_layer.bias is None else read(file_layer.bias, dtypes[file_layer.bias])
    layer = layer_around(file_layer.kind, weight, bias)
    try:
        fused, worst = fused_and_checked(layer, file_layer.pairs, scale, name, phases)
    except SafemergeError as error:
        error.add_note(f"fuse_files: layer {name!r} of {checkpoint.path}")
        raise
    except Exception as error:
        raise ModelFuseError(
            f"fusing layer {name!r} of {checkpoint.path} failed with {type(error).__name__}: "
            f"{error}; nothing was written",
            problems=[(name, f"{type(error).__name__}: {error}")],
            path=checkpoint.path,
        ) from error
    shape, record = tuple(weight.shape), fused.record
    tensors = {
        name: (
            fused.weight,
            TensorResult(name, record.kind, shape, weight.dtype, worst, 0.0, len(file_layer.pairs)),
        )
    }
    if bias is not None and file_layer.bias is not None:
        tensors[file_layer.bias] = (
            bias if fused.bias is None else fused.bias,
            TensorResult(
                file_layer.bias,
                BIAS,
                tuple(bias.shape),
                bias.dtype,
                None,
                0.0,
                len(file_layer.pairs),
            ),
        )
    return tensors


def fused_and_checked(
    layer: nn.Module,
    pairs: Sequence[tuple[LoraAdapter, float]],
    scale: float,
    name: str,
    phases: PhaseTimes | None = None,
) -> tuple[FusedTensors, float]:
    """The guarded fuse of ``layer`` into new tensors (the layer left as it is), and its
    every element's worst ratio to its error bound, checked against the original weight
    (a ModelFuseError past 1). ``phases`` gets the time spent fusing and checking."""
    phases = phases or PhaseTimes()
    with phases.timing("check"):  # what the bound needs from the weight, before the fuse
        check = BoundCheck(layer, name, pairs, scale, copy_original=False)
    with phases.timing("fuse"):
        fused = fused_tensors(layer, pairs, scale=scale, name=name)
    with phases.timing("check"):
        worst = checked_against_bound(check, fused.record, name, fused.weight)
    return fused, worst
