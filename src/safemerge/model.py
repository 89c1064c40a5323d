"""Fusing adapters into whole models as one transaction: a module in memory, or files on disk.

:func:`fuse_model` fuses every adapted layer of a ``torch.nn.Module`` and, if any layer
fails (a refusal, any exception, a KeyboardInterrupt), unfuses the layers already fused,
exactly and in reverse order, so every parameter is bit for bit what it was.

:func:`fuse_files` streams a safetensors model from disk to disk: the base is opened
lazily, every check that can be made up front is made before anything is written, then
each tensor is read, cast, fused if adapted, checked against its error bound, written
and dropped; the output appears whole, through :func:`safemerge.writer.write_model`, or
not at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

import torch
from torch import nn

from safemerge import bnb, files, writer
from safemerge.adapter import LoraAdapter
from safemerge.adapter_formats import AdapterSet, load_adapter
from safemerge.errors import (
    AdapterConfigError,
    ModelFuseError,
    ModelWriteError,
    SafemergeError,
    UnsupportedLayerError,
)
from safemerge.files import Checkpoint
from safemerge.fuse import fuse, unfuse
from safemerge.layer_bound import BoundCheck
from safemerge.layers import LayerView, view_layer
from safemerge.memory import peak_rss_bytes, release_free_heap
from safemerge.model_report import (
    BIAS,
    CAST,
    UNCHANGED,
    LayerResult,
    ModelFuseReport,
)
from safemerge.numerics import SUPPORTED_DTYPES
from safemerge.quantized import QuantizedFuseRecord
from safemerge.record import FuseRecord
from safemerge.request import check_request

#: Adapters for :func:`fuse_model`: loaded sets, each optionally with its weight.
AdapterSets: TypeAlias = Sequence[AdapterSet | tuple[AdapterSet, float]]
#: Adapters for :func:`fuse_files`: paths, each optionally with its weight.
AdapterPaths: TypeAlias = Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float]]

_PROBLEM_CAP = 20
#: After writing a tensor at least this large, freed heap memory is handed back.
_TRIM_BYTES = 1 << 20


# -- in memory -----------------------------------------------------------------------------


def fuse_model(
    module: nn.Module,
    adapters: AdapterSets,
    *,
    scale: float = 1.0,
    prefix: str = "",
) -> ModelFuseReport:
    """Fuse adapter sets into every layer they adapt in ``module``: all layers, or none.

    Load each set against the module's own names and shapes, e.g.
    ``load_adapter(path, base=safemerge.weight_shapes(module))`` (for a module
    without quantized layers, ``base=module.state_dict()`` does the same). Several
    adapters on one layer are fused together, in one :func:`safemerge.fuse`.

    Args:
        module: the model, changed in place.
        adapters: :class:`AdapterSet` s, or ``(adapter_set, weight)`` pairs.
        scale: overall multiplier for every adapter (PEFT's ``lora_scale``).
        prefix: prepended to the sets' weight names to find the module's layers (for a
            set loaded against a sub-model, e.g. ``"model."``).

    Returns:
        A :class:`ModelFuseReport` whose ``records`` undo the fuse exactly
        (:func:`unfuse_model`).

    Raises:
        ModelFuseError: before any change, listing every layer that is unknown, of an
            unsupported kind, does not fit its adapters (shape, options, DoRA on a quantized
            layer or with other adapters), or shares its weight with another parameter;
            or after a rollback, for an unexpected exception in one layer's fuse.
        NonFiniteMergeError: a layer's merge would not be finite; every layer already
            fused was restored exactly.
        KeyboardInterrupt: likewise restored, then re-raised.
    """
    started = time.perf_counter()
    requested = _requests(adapters, scale)
    layers = _module_layers(module, requested, scale, prefix)
    records: dict[str, FuseRecord | QuantizedFuseRecord] = {}
    results: list[LayerResult] = []
    current = ""
    try:
        for position, (name, (layer, pairs)) in enumerate(layers.items(), start=1):
            current = name
            layer_started = time.perf_counter()
            check = None if bnb.is_bnb_layer(layer) else BoundCheck(layer, name, pairs, scale)
            with interrupts_deferred():  # a fused layer always has its record kept
                record = fuse(layer, pairs, scale=scale, name=name, exact_unfuse=True)
                records[name] = record
            worst = (
                record.worst_error_of_bound
                if isinstance(record, QuantizedFuseRecord)
                else _checked(check, record, name)
            )
            results.append(
                LayerResult(
                    name=name,
                    kind=record.kind,
                    shape=tuple(record.shape),
                    dtype=_held_dtype(layer, record),
                    worst_error_of_bound=worst,
                    seconds=time.perf_counter() - layer_started,
                    adapters=len(pairs),
                    position=position,
                    total=len(layers),
                )
            )
    except BaseException as error:
        restored = roll_back(layers, records, failed=current, error=error)
        if isinstance(error, SafemergeError) or not isinstance(error, Exception):
            error.add_note(
                f"fuse_model: layer {current!r} failed; the {len(restored)} layer(s) fused "
                f"before it were restored exactly: the model is unchanged"
            )
            raise
        raise ModelFuseError(
            f"fusing layer {current!r} failed with {type(error).__name__}: {error}. The "
            f"{len(restored)} layer(s) fused before it were restored exactly: the model is "
            f"unchanged",
            problems=[(current, f"{type(error).__name__}: {error}")],
            rolled_back=restored,
        ) from error
    return ModelFuseReport.in_memory(results, records, seconds=time.perf_counter() - started)


def unfuse_model(module: nn.Module, report: ModelFuseReport, *, exact: bool = True) -> None:
    """Undo :func:`fuse_model`, layer by layer in reverse order (see :func:`safemerge.unfuse`).

    Raises:
        RestoreError: a layer changed since the fuse, or is not the one fused.
    """
    for name, record in reversed(report.records.items()):
        module_name = _module_name(name, "")
        assert module_name is not None  # fuse_model only fuses names that had one
        unfuse(module.get_submodule(module_name), record, exact=exact)


def weight_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Each weight's logical shape by name, for :func:`safemerge.load_adapter`'s ``base``.

    Like ``module.state_dict()``'s shapes, except that a bitsandbytes layer's packed
    weight is given its ``(out_features, in_features)``.
    """
    shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    for name, layer in module.named_modules():
        quantized_format = bnb.format_of(layer, name)
        if quantized_format is not None:
            key = f"{name}.weight" if name else "weight"
            shapes[key] = tuple(int(size) for size in quantized_format.shape)
    return shapes


# -- disk to disk --------------------------------------------------------------------------


def fuse_files(
    base: str | os.PathLike[str],
    adapters: AdapterPaths,
    output: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    shard_size: int = writer.DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: Callable[[LayerResult], None] | None = None,
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

    Args:
        base: a model directory (``model.safetensors``, or shards and their index), an
            index file, or one ``.safetensors`` file (then no other file is copied).
        adapters: adapter paths (PEFT directories, kohya or diffusers files), or
            ``(path, weight)`` pairs; several adapters on one layer are fused together.
        output: the model directory to create.
        scale: overall multiplier for every adapter.
        dtype: the output's floating-point dtype (every floating tensor is cast, and
            adapters are fused in it); None keeps each tensor's own dtype.
        shard_size: the largest shard, in bytes (a larger tensor gets its own shard).
        overwrite: replace an existing ``output``, once the new model is complete.
        progress: called with each tensor's :class:`LayerResult` once it is ready to
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
    base_path = Path(base)
    output_path = Path(output)
    writer.check_output(output_path, overwrite=overwrite)
    _check_scale(scale)
    _check_dtype(dtype)
    weighted_paths = _paths(adapters)
    _refuse_output_over_inputs(output_path, [base_path, *(path for path, _ in weighted_paths)])
    with files.open_checkpoint(base_path) as checkpoint:
        sets = [(load_adapter(path, base=checkpoint), weight) for path, weight in weighted_paths]
        plan = [
            (name, checkpoint.info(name).shape, _output_dtype(checkpoint.info(name).dtype, dtype))
            for name in checkpoint.names
        ]
        dtypes = {name: planned_dtype for name, _, planned_dtype in plan}
        layers = _file_layers(checkpoint, sets, scale, dtypes)
        copy_from = _copy_source(base_path)
        if copy_from is not None and (copy_from / "config.json").is_file():
            files.read_json(copy_from / "config.json")  # a truncated config fails now, not later
        _check_space(output_path, plan, copy_from)
        metadata = _provenance(checkpoint.metadata, sets, scale, dtype)
        results: list[LayerResult] = []
        tensors = _fused_tensors(checkpoint, plan, layers, scale, results, progress)
        try:
            written = writer.write_model(
                output_path,
                tensors,
                plan=plan,
                shard_size=shard_size,
                metadata=metadata,
                copy_from=copy_from,
                overwrite=overwrite,
            )
        except SafemergeError as error:
            error.add_note(f"fuse_files: nothing was written to {output_path}")
            raise
    return ModelFuseReport(
        layers=tuple(results),
        parameters=sum(result.numel for result in results),
        fused_parameters=sum(result.numel for result in results if result.fused),
        tensors_written=written.tensors,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        output=written.path,
        shard_count=written.shard_count,
        written_bytes=written.total_size,
        metadata=metadata,
        copied=written.copied,
    )


# -- in memory: the steps ------------------------------------------------------------------


def _requests(adapters: AdapterSets, scale: float) -> dict[str, list[tuple[LoraAdapter, float]]]:
    """Per weight name, every ``(adapter, weight)`` to fuse into it, in the sets' order."""
    _check_scale(scale)
    requested: dict[str, list[tuple[LoraAdapter, float]]] = {}
    for adapter_set, weight in _weighted_sets(adapters):
        for name, adapter in adapter_set.layers.items():
            requested.setdefault(name, []).append((adapter, weight))
    return requested


def _weighted_sets(adapters: AdapterSets) -> list[tuple[AdapterSet, float]]:
    if isinstance(adapters, AdapterSet):
        adapters = [adapters]
    pairs: list[tuple[AdapterSet, float]] = []
    for position, item in enumerate(adapters):
        if isinstance(item, AdapterSet):
            pairs.append((item, 1.0))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], AdapterSet):
            pairs.append((item[0], _finite_weight(item[1], position)))
        else:
            raise AdapterConfigError(
                f"adapters[{position}] must be an AdapterSet (safemerge.load_adapter) or an "
                f"(AdapterSet, weight) pair; got {type(item).__name__}"
            )
    if not pairs:
        raise AdapterConfigError("no adapters given: pass at least one AdapterSet")
    return pairs


def _module_layers(
    module: nn.Module,
    requested: Mapping[str, list[tuple[LoraAdapter, float]]],
    scale: float,
    prefix: str,
) -> dict[str, tuple[nn.Module, list[tuple[LoraAdapter, float]]]]:
    """The layers to fuse, in module order, or a ModelFuseError listing every misfit."""
    order = {name: position for position, (name, _) in enumerate(module.named_modules())}
    owners = tensor_owners(module)
    problems: list[tuple[str, str]] = []
    found: list[tuple[int, str, nn.Module]] = []
    for name, pairs in requested.items():
        module_name = _module_name(name, prefix)
        if module_name is None:
            problems.append((name, "is not a weight name (it does not end in '.weight')"))
            continue
        try:
            layer = module.get_submodule(module_name)
        except AttributeError:
            problems.append((name, f"the model has no module {module_name!r}"))
            continue
        problem = _layer_problem(layer, prefix + name, pairs, scale)
        if problem is None:
            problem = shared_weight(layer, prefix + name, owners)
        if problem is not None:
            problems.append((prefix + name, problem))
            continue
        found.append((order.get(module_name, len(order)), prefix + name, layer))
    if problems:
        raise refusal(problems, None, f"the model ({type(module).__name__}) was not changed")
    return {name: (layer, requested[name.removeprefix(prefix)]) for _, name, layer in sorted(found)}


def _module_name(weight_name: str, prefix: str) -> str | None:
    if weight_name == "weight":
        return prefix.removesuffix(".")
    if not weight_name.endswith(".weight"):
        return None
    return prefix + weight_name.removesuffix(".weight")


def _layer_problem(
    layer: nn.Module, name: str, pairs: list[tuple[LoraAdapter, float]], scale: float
) -> str | None:
    """What keeps ``adapters`` from fusing into ``layer``, checked without changing it."""
    try:
        quantized_format = bnb.format_of(layer, name)
        if quantized_format is not None:
            if any(adapter.is_dora for adapter, _ in pairs):
                return "DoRA adapters are not fused into quantized layers"
            bias = getattr(layer, "bias", None)
            view = LayerView(
                name,
                quantized_format.kind,
                torch.empty(quantized_format.shape, device="meta"),
                bias if isinstance(bias, torch.Tensor) else None,
                (int(quantized_format.shape[0]), int(quantized_format.shape[1])),
                False,
            )
        elif bnb.is_bnb_layer(layer):
            return f"bitsandbytes {type(layer).__name__} layers are not fused"
        else:
            view = view_layer(layer, name)
        check_request(view, pairs, scale)
    except (AdapterConfigError, UnsupportedLayerError) as error:
        return str(error)
    return None


def tensor_owners(module: nn.Module) -> dict[int, list[str]]:
    """Names of every parameter and buffer, by the address of the storage they use."""
    owners: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers()]
    for name, tensor in named:
        if tensor.device.type != "meta" and tensor.numel() > 0:
            owners.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    return owners


def shared_weight(layer: nn.Module, name: str, owners: Mapping[int, list[str]]) -> str | None:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return None
    if weight.numel() == 0:
        return None
    sharing = owners.get(weight.untyped_storage().data_ptr(), [])
    if len(sharing) > 1:
        shown = ", ".join(repr(other) for other in sharing[:4])
        return (
            f"its weight is shared by {len(sharing)} parameters ({shown}; tied weights): "
            f"fusing would change them all; untie them first (clone the weight)"
        )
    return None


def _checked(check: BoundCheck | None, record: FuseRecord, name: str) -> float:
    assert check is not None
    worst = check.worst(record.coefficients)
    if not worst <= 1.0:
        raise _bound_error(name, worst)
    return worst


def _held_dtype(layer: nn.Module, record: FuseRecord | QuantizedFuseRecord) -> torch.dtype:
    if isinstance(record, FuseRecord):
        return record.dtype
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.uint8


def roll_back(
    layers: Mapping[str, tuple[nn.Module, list[tuple[LoraAdapter, float]]]],
    records: Mapping[str, FuseRecord | QuantizedFuseRecord],
    *,
    failed: str,
    error: BaseException,
) -> list[str]:
    """Unfuse every fused layer exactly, newest first; interrupts wait until it is done."""
    restored: list[str] = []
    with interrupts_deferred():
        for name in reversed(list(records)):
            try:
                unfuse(layers[name][0], records[name], exact=True)
            except Exception as restore_error:
                left = [other for other in records if other not in restored]
                raise ModelFuseError(
                    f"fusing layer {failed!r} failed ({type(error).__name__}: {error}), and "
                    f"restoring layer {name!r} then failed too ({restore_error}): layers "
                    f"{left} may hold fused weights. Reload the model",
                    problems=[(failed, str(error)), (name, str(restore_error))],
                    rolled_back=restored,
                ) from restore_error
            restored.append(name)
    return restored


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) until the block ends, then raise KeyboardInterrupt once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# -- disk to disk: the steps ---------------------------------------------------------------


@dataclass(frozen=True)
class _FileLayer:
    """An adapted weight of a checkpoint: its kind, adapters, and the bias a LoRA bias needs."""

    weight: str
    kind: str
    pairs: list[tuple[LoraAdapter, float]]
    bias: str | None


def _paths(adapters: AdapterPaths) -> list[tuple[Path, float]]:
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    pairs: list[tuple[Path, float]] = []
    for position, item in enumerate(adapters):
        if isinstance(item, tuple) and len(item) == 2:
            pairs.append((Path(item[0]), _finite_weight(item[1], position)))
        elif isinstance(item, (str, os.PathLike)):
            pairs.append((Path(item), 1.0))
        else:
            raise AdapterConfigError(
                f"adapters[{position}] must be a path or a (path, weight) pair; got "
                f"{type(item).__name__}"
            )
    if not pairs:
        raise AdapterConfigError("no adapters given: pass at least one adapter path")
    return pairs


def _finite_weight(weight: Any, position: int) -> float:
    value = float(weight)
    if not math.isfinite(value):
        raise AdapterConfigError(f"the weight of adapters[{position}] must be finite; got {weight}")
    return value


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise AdapterConfigError(f"scale must be finite; got scale={scale}")


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise AdapterConfigError(f"dtype={dtype} is not an output dtype safemerge writes: {names}")


def _output_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _refuse_output_over_inputs(output: Path, inputs: Sequence[Path]) -> None:
    target = output.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ModelWriteError(
                f"output {output} would overlap input {path}; the inputs are never "
                f"modified: write the merged model to a new directory",
                path=output,
                reason="same-as-input",
            )


def _file_layers(
    checkpoint: Checkpoint,
    sets: Sequence[tuple[AdapterSet, float]],
    scale: float,
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, _FileLayer]:
    """Every adapted weight, checked up front on meta tensors; a ModelFuseError lists misfits."""
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
    layers: dict[str, _FileLayer] = {}
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
            layer = _layer(kinds[name], weight_meta, bias_meta)
            check_request(view_layer(layer, name), pairs, scale)
        except (AdapterConfigError, UnsupportedLayerError) as error:
            problems.append((name, str(error)))
            continue
        layers[name] = _FileLayer(name, kinds[name], pairs, bias)
    if problems:
        raise refusal(problems, checkpoint.path, "nothing was written")
    return layers


class _StoredTransposed(nn.Module):
    """A matmul layer storing its weight ``(in, out)`` (GPT-2's Conv1D), for the fuse."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias


def _layer(kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
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


def _copy_source(base: Path) -> Path | None:
    if base.is_dir():
        return base
    if base.name.endswith(".safetensors.index.json"):
        return base.parent
    return None


def _check_space(
    output: Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]], copy_from: Path | None
) -> None:
    needed = sum(files.tensor_nbytes(shape, dtype) for _, shape, dtype in plan)
    if copy_from is not None:
        needed += sum(path.stat().st_size for path in writer.files_to_copy(copy_from))
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


def _provenance(
    base_metadata: Mapping[str, str],
    sets: Sequence[tuple[AdapterSet, float]],
    scale: float,
    dtype: torch.dtype | None,
) -> dict[str, str]:
    """The base's safetensors metadata, plus what safemerge fused into it."""
    from safemerge import __version__  # the package imports this module first

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
    layers: Mapping[str, _FileLayer],
    scale: float,
    results: list[LayerResult],
    progress: Callable[[LayerResult], None] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor in plan order: read, cast, fused if adapted; its result recorded."""
    by_bias = {layer.bias: layer for layer in layers.values() if layer.bias is not None}
    dtypes = {name: dtype for name, _, dtype in plan}
    done: dict[str, tuple[torch.Tensor, LayerResult]] = {}
    total = len(plan)
    for position, (name, shape, dtype) in enumerate(plan, start=1):
        started = time.perf_counter()
        if name not in done:
            layer = layers.get(name) or by_bias.get(name)
            if layer is None:
                tensor = _read(checkpoint, name, dtype)
                kind = UNCHANGED if tensor.dtype == checkpoint.info(name).dtype else CAST
                result = LayerResult(name, kind, shape, dtype, None, 0.0)
                done[name] = (tensor, result)
            else:
                done.update(_fuse_file_layer(checkpoint, layer, scale, dtypes))
        tensor, result = done.pop(name)
        result = _placed(result, position, total, time.perf_counter() - started)
        results.append(result)
        if progress is not None:
            progress(result)
        yield name, tensor
        del tensor
        if files.tensor_nbytes(shape, dtype) >= _TRIM_BYTES:
            release_free_heap()


def _placed(result: LayerResult, position: int, total: int, seconds: float) -> LayerResult:
    return LayerResult(
        result.name,
        result.kind,
        result.shape,
        result.dtype,
        result.worst_error_of_bound,
        result.seconds + seconds,
        result.adapters,
        position,
        total,
    )


def _read(checkpoint: Checkpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    # Not through a memory map: its pages would stay resident, growing memory to the model.
    tensor = checkpoint.read(name, mapped=False)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _fuse_file_layer(
    checkpoint: Checkpoint,
    file_layer: _FileLayer,
    scale: float,
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, tuple[torch.Tensor, LayerResult]]:
    """Read one adapted layer (weight, and bias when a LoRA bias needs it), fuse and check it."""
    started = time.perf_counter()
    name = file_layer.weight
    weight = _read(checkpoint, name, dtypes[name])
    bias = (
        None
        if file_layer.bias is None
        else _read(checkpoint, file_layer.bias, dtypes[file_layer.bias])
    )
    layer = _layer(file_layer.kind, weight, bias)
    try:
        check = BoundCheck(layer, name, file_layer.pairs, scale)
        record = fuse(layer, file_layer.pairs, scale=scale, name=name, exact_unfuse=False)
        assert isinstance(record, FuseRecord)
        worst = _checked(check, record, name)
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
    seconds = time.perf_counter() - started
    shape = tuple(weight.shape)
    fused = {
        name: (
            weight,
            LayerResult(
                name, record.kind, shape, weight.dtype, worst, seconds, len(file_layer.pairs)
            ),
        )
    }
    if bias is not None and file_layer.bias is not None:
        fused[file_layer.bias] = (
            bias,
            LayerResult(
                file_layer.bias,
                BIAS,
                tuple(bias.shape),
                bias.dtype,
                None,
                0.0,
                len(file_layer.pairs),
            ),
        )
    return fused


# -- errors --------------------------------------------------------------------------------


def refusal(
    problems: Sequence[tuple[str, str]], path: Path | None, unchanged: str
) -> ModelFuseError:
    shown = "\n".join(f"  {layer}: {what}" for layer, what in problems[:_PROBLEM_CAP])
    more = len(problems) - _PROBLEM_CAP
    tail = f"\n  ... and {more} more" if more > 0 else ""
    where = f" of {path}" if path is not None else ""
    return ModelFuseError(
        f"refusing to fuse: {len(problems)} layer(s){where} cannot be fused as asked; "
        f"{unchanged}:\n{shown}{tail}\nCheck that the adapters were trained for this "
        f"model, or leave out the layers named",
        problems=problems,
        path=path,
    )


def _bound_error(name: str, worst: float) -> ModelFuseError:
    return ModelFuseError(
        f"layer {name!r}: the fused weight is {worst:.3g} times its error bound away from "
        f"the exact merge somewhere; the fuse is wrong (a bug, or memory corruption). "
        f"Please report it",
        problems=[(name, f"error {worst:.3g} of its bound")],
    )
