"""QLoRA merges done right: a bitsandbytes-quantized export, and the QLoRA-faithful merge.

:func:`export_files` is :func:`safemerge.model.streaming.fuse_files` with two more
choices, streaming file by file with the same up-front checks and all-or-nothing write:

- ``base_quant``: the base is first taken as the adapter was trained against it, every
  Linear that transformers quantizes replaced by ``cast(dequant(quant(W)))`` (safemerge's
  own dequantization, in the weight's dtype as bitsandbytes dequantizes for compute);
- ``quant``: the output is a bitsandbytes checkpoint transformers loads quantized
  (``config.json`` gains its ``quantization_config``); each adapted Linear is fused into
  its quantized base through the guarded quantized path (:func:`safemerge.fuse` on a
  ``Linear4bit``/``Linear8bitLt``: requantized, every element checked against its block's
  bound), every other one quantized as transformers would.

Every adapted quantizable layer is also measured (:mod:`safemerge.model.base_quant`):
how far each way of merging it is from the output its adapter was trained to give.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from safemerge.errors import ModelFuseError, ModelWriteError, SafemergeError
from safemerge.io import writer
from safemerge.io.adapter_formats import load_adapter
from safemerge.io.bnb_checkpoint import (
    QuantSpec,
    dequantized,
    layer_tensors,
    planned,
    quantized_linear,
)
from safemerge.io.checkpoint import Checkpoint, open_checkpoint, read_json
from safemerge.io.shard_writer import tensor_nbytes
from safemerge.layer import fuse
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.request import coefficients as coefficients_of
from safemerge.model import base_quant, bnb_targets, streaming
from safemerge.model.fuse_arguments import AdapterPaths, check_fuse_arguments, output_dtype
from safemerge.model.memory import release_free_heap
from safemerge.model.read_ahead import read_tensor
from safemerge.model.report import CAST, QUANTIZED, UNCHANGED, ModelFuseReport, TensorResult
from safemerge.model.transaction import plan_error
from safemerge.quant.quantized import QuantizedFuseRecord

#: Output dtypes a quantized Linear may be quantized from (bitsandbytes' inputs).
_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Export:
    """What to do with the quantizable Linear weights, fixed before anything is read."""

    quant: QuantSpec | None
    base_quant: QuantSpec | None
    linears: frozenset[str]  # weight names (``"...q_proj.weight"``) transformers quantizes

    @property
    def reference(self) -> QuantSpec:
        """The quantization the adapters were trained against."""
        spec = self.base_quant or self.quant
        assert spec is not None
        return spec

    @property
    def written_choice(self) -> str:
        return "quantized" if self.quant is not None else "16bit_dequantized"


def export_files(
    base: str | os.PathLike[str],
    adapters: AdapterPaths,
    output: str | os.PathLike[str],
    *,
    quant: QuantSpec | None = None,
    base_quant: QuantSpec | None = None,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    shard_size: int = writer.DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: Callable[[TensorResult], None] | None = None,
) -> ModelFuseReport:
    """Fuse adapter files into a model directory, quantized (``quant``) and/or into the
    QLoRA base the adapters were trained against (``base_quant``); see the module.

    Arguments as :func:`safemerge.fuse_files`, plus:
        quant: write the merged model as a bitsandbytes checkpoint with these settings.
        base_quant: merge into ``dequant(quant(W))`` with these settings (4-bit), the
            weights a QLoRA adapter was trained against.

    Each adapted Linear's :class:`TensorResult` carries ``qlora``: the output error of
    the plain 16-bit merge, of the merge into the dequantized base and of the requantized
    merge, against the output the adapter was trained to give, and the blocks the
    requantized merge left unchanged.

    Raises:
        As :func:`safemerge.fuse_files`; also CheckpointError when ``base`` is not a model
        directory with a ``config.json`` transformers can build, ModelFuseError for an
        adapted quantized layer that is not a plain LoRA on a Linear (DoRA, LoRA bias).
        Nothing is left under ``output``.
    """
    started = time.perf_counter()
    if quant is None and base_quant is None:
        return streaming.fuse_files(
            base, adapters, output, scale=scale, dtype=dtype, shard_size=shard_size,
            overwrite=overwrite, progress=progress,
        )  # fmt: skip
    if base_quant is not None and not base_quant.four_bit:
        raise ModelFuseError(
            f"base_quant={base_quant.quant_type!r}: QLoRA trains against a 4-bit base; "
            f"choose nf4 or fp4",
            problems=[],
        )
    base_path, output_path = Path(base), Path(output)
    weighted_paths = check_fuse_arguments(
        base_path, adapters, output_path, scale=scale, dtype=dtype, overwrite=overwrite
    )
    model_dir = streaming.copy_source(base_path)
    if model_dir is None:
        model_dir = base_path.parent  # a lone .safetensors file: its config must be beside it
    with open_checkpoint(base_path) as checkpoint:
        sets = [(load_adapter(path, base=checkpoint), weight) for path, weight in weighted_paths]
        dtypes = {
            name: output_dtype(checkpoint.info(name).dtype, dtype) for name in checkpoint.names
        }
        layers = streaming.file_layers(checkpoint, sets, scale, dtypes)
        modules = bnb_targets.quantized_linears(model_dir, quant or base_quant)  # type: ignore[arg-type]
        export = _Export(quant, base_quant, _quantized_weights(checkpoint, modules, dtypes))
        _check_adapted(checkpoint, export, layers)
        plan = _output_plan(checkpoint, export, dtypes)
        config = read_json(model_dir / "config.json")
        if quant is not None:
            config["quantization_config"] = bnb_targets.quantization_config(
                quant, _compute_dtype(export, dtypes)
            )
        _check_space(output_path, plan, model_dir)
        metadata = {
            **streaming.provenance(checkpoint.metadata, sets, scale, dtype),
            "safemerge_quant": "none" if quant is None else quant.describe(),
            "safemerge_base_quant": "none" if base_quant is None else base_quant.describe(),
        }
        results: list[TensorResult] = []
        tensors = _exported_tensors(checkpoint, export, layers, dtypes, scale, results, progress)
        try:
            written = writer.write_model(
                output_path,
                tensors,
                plan=plan,
                shard_size=shard_size,
                metadata=metadata,
                copy_from=model_dir,
                extra_files={"config.json": _json_bytes(config)},
                overwrite=overwrite,
            )
        except SafemergeError as error:
            error.add_note(f"export_files: nothing was written to {output_path}")
            raise
    return ModelFuseReport.on_disk(
        results,
        started=started,
        output=written.path,
        tensors_written=written.tensors,
        shard_count=written.shard_count,
        written_bytes=written.total_size,
        metadata=metadata,
        # The new config.json stands where the base's was: listed among the other files.
        copied=tuple(sorted((*written.copied, *written.added), key=PurePosixPath)),
    )


def _quantized_weights(
    checkpoint: Checkpoint,
    modules: Mapping[str, tuple[int, int]],
    dtypes: Mapping[str, torch.dtype],
) -> frozenset[str]:
    """The checkpoint's weights of the modules transformers quantizes; all must fit."""
    weights = {f"{module}.weight": shape for module, shape in modules.items()}
    found = {name: shape for name, shape in weights.items() if name in checkpoint}
    if not found:
        raise ModelFuseError(
            f"none of the {len(weights)} Linear layers transformers quantizes in this model "
            f"(e.g. {next(iter(weights), '?')!r}) is a weight of {checkpoint.path}: the "
            f"checkpoint's names do not follow the model class's modules",
            problems=[],
            path=checkpoint.path,
        )
    problems = [
        (name, f"is {dtypes[name]} {checkpoint.info(name).shape}, not a {shape} float weight")
        for name, shape in found.items()
        if tuple(checkpoint.info(name).shape) != shape or dtypes[name] not in _QUANTIZABLE
    ]
    if problems:
        raise plan_error(problems, checkpoint.path, "nothing was written")
    return frozenset(found)


def _check_adapted(
    checkpoint: Checkpoint, export: _Export, layers: Mapping[str, streaming.FileLayer]
) -> None:
    """A quantized or QLoRA layer takes plain LoRA (the comparison's ``delta = c B A``)."""
    problems = []
    for name, layer in layers.items():
        if name not in export.linears:
            continue
        if any(adapter.is_dora for adapter, _ in layer.pairs):
            problems.append((name, "DoRA is not merged into a quantized or QLoRA base"))
        elif layer.bias is not None:
            problems.append((name, "a LoRA bias is not merged into a quantized or QLoRA base"))
    if problems:
        raise plan_error(problems, checkpoint.path, "nothing was written")


def _output_plan(
    checkpoint: Checkpoint, export: _Export, dtypes: Mapping[str, torch.dtype]
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    plan: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name in checkpoint.names:
        shape = tuple(checkpoint.info(name).shape)
        if export.quant is not None and name in export.linears:
            plan += planned(name.removesuffix("weight"), shape, export.quant, dtypes[name])
        else:
            plan.append((name, shape, dtypes[name]))
    return plan


def _compute_dtype(export: _Export, dtypes: Mapping[str, torch.dtype]) -> torch.dtype:
    """The dtype the quantized layers compute in: their weights' (the first one's)."""
    return dtypes[min(export.linears)]


def _check_space(output: Path, plan: Sequence[tuple[str, Any, torch.dtype]], source: Path) -> None:
    needed = sum(tensor_nbytes(shape, dtype) for _, shape, dtype in plan)
    needed += sum(path.stat().st_size for path in writer.files_to_copy(source))
    existing = output.absolute().parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise ModelWriteError(
            f"not enough disk space for {output}: the export needs about "
            f"{needed / 2**30:.2f} GiB but {existing} has {free / 2**30:.2f} GiB free; free "
            f"some space or write elsewhere",
            path=output,
            reason="disk-space",
        )


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    """``value`` as :func:`safemerge.io.atomic.save_json` writes it (indented, key order kept)."""
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def _exported_tensors(
    checkpoint: Checkpoint,
    export: _Export,
    layers: Mapping[str, streaming.FileLayer],
    dtypes: Mapping[str, torch.dtype],
    scale: float,
    results: list[TensorResult],
    progress: Callable[[TensorResult], None] | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each checkpoint tensor in order, exported; its result recorded before it is yielded."""
    names = checkpoint.names
    pending: dict[str, tuple[torch.Tensor, TensorResult]] = {}
    for position, name in enumerate(names, start=1):
        started = time.perf_counter()
        if name in export.linears:
            tensors, result = _export_linear(
                checkpoint, name, export, layers.get(name), dtypes[name], scale
            )
        else:
            if name not in pending:
                pending.update(_float_tensor(checkpoint, name, layers, dtypes, scale))
            tensor, result = pending.pop(name)
            tensors = [(name, tensor)]
        result = dataclasses.replace(
            result, seconds=time.perf_counter() - started, position=position, total=len(names)
        )
        results.append(result)
        if progress is not None:
            progress(result)
        nbytes = sum(tensor.numel() * tensor.element_size() for _, tensor in tensors)
        yield from tensors
        del tensors
        if nbytes >= 1 << 20:
            release_free_heap()


def _float_tensor(
    checkpoint: Checkpoint,
    name: str,
    layers: Mapping[str, streaming.FileLayer],
    dtypes: Mapping[str, torch.dtype],
    scale: float,
) -> dict[str, tuple[torch.Tensor, TensorResult]]:
    """A tensor written unquantized: fused as :func:`safemerge.fuse_files` fuses it when it
    is adapted (an embedding, an ``lm_head``) or its bias, else read and cast."""
    owner = next((weight for weight, layer in layers.items() if name in (weight, layer.bias)), None)
    if owner is not None:
        return streaming.fuse_file_layer(checkpoint, layers[owner], scale, dtypes)
    tensor = read_tensor(checkpoint, name, dtypes[name])
    kind = UNCHANGED if tensor.dtype == checkpoint.info(name).dtype else CAST
    return {name: (tensor, TensorResult(name, kind, tuple(tensor.shape), tensor.dtype, None, 0.0))}


def _export_linear(
    checkpoint: Checkpoint,
    name: str,
    export: _Export,
    file_layer: streaming.FileLayer | None,
    dtype: torch.dtype,
    scale: float,
) -> tuple[list[tuple[str, torch.Tensor]], TensorResult]:
    """One Linear transformers quantizes: its base as trained against, fused if adapted,
    quantized if asked; its tensors under their output names, and its result."""
    try:
        return _export_linear_unguarded(checkpoint, name, export, file_layer, dtype, scale)
    except SafemergeError as error:
        error.add_note(f"export_files: layer {name!r} of {checkpoint.path}")
        raise
    except Exception as error:
        raise ModelFuseError(
            f"exporting layer {name!r} of {checkpoint.path} failed with "
            f"{type(error).__name__}: {error}; nothing was written",
            problems=[(name, f"{type(error).__name__}: {error}")],
            path=checkpoint.path,
        ) from error


def _export_linear_unguarded(
    checkpoint: Checkpoint,
    name: str,
    export: _Export,
    file_layer: streaming.FileLayer | None,
    dtype: torch.dtype,
    scale: float,
) -> tuple[list[tuple[str, torch.Tensor]], TensorResult]:
    original = read_tensor(checkpoint, name, dtype)
    base = original
    if export.base_quant is not None:
        base = dequantized(quantized_linear(original, export.base_quant), name).to(dtype)
    shape = tuple(original.shape)
    if file_layer is None:  # not adapted: the base as trained against, quantized if asked
        if export.quant is None:
            return [(name, base)], TensorResult(name, "qlora_base", shape, dtype, None, 0.0)
        layer = quantized_linear(base, export.quant)
        tensors = layer_tensors(name.removesuffix("weight"), layer, export.quant)
        return tensors, TensorResult(name, QUANTIZED, shape, dtype, None, 0.0)
    pairs = file_layer.pairs
    if export.quant is not None:
        layer = quantized_linear(base, export.quant)
        record = _fused_quantized(layer, pairs, scale, name)
        written: tuple[torch.Tensor, QuantizedFuseRecord | None] = (
            dequantized(layer, name),
            record,
        )
        tensors = layer_tensors(name.removesuffix("weight"), layer, export.quant)
        kind, worst = record.kind, record.worst_error_of_bound
    else:
        merged, worst = _fused_16bit(base, pairs, scale, name)  # base stays as it was
        written, tensors, kind = (merged, None), [(name, merged)], "linear"
    comparison = _compare(original, base, written, export, pairs, scale, name)
    result = TensorResult(
        name, kind, shape, dtype, worst, 0.0, len(pairs), qlora=comparison.fields()
    )
    return tensors, result


def _fused_16bit(
    weight: torch.Tensor, pairs: list[tuple[LoraAdapter, float]], scale: float, name: str
) -> tuple[torch.Tensor, float]:
    """The guarded float fuse of ``weight`` into a new tensor, every element checked, and
    its worst ratio to its bound: as :func:`safemerge.fuse_files` fuses a Linear."""
    layer = streaming.layer_around("linear", weight, None)
    fused, worst = streaming.fused_and_checked(layer, pairs, scale, name)
    return fused.weight, worst


def _fused_quantized(
    layer: nn.Module, pairs: list[tuple[LoraAdapter, float]], scale: float, name: str
) -> QuantizedFuseRecord:
    """The guarded quantized fuse, every element checked against its block's bound."""
    record = fuse(layer, pairs, scale=scale, name=name, exact_unfuse=False)
    assert isinstance(record, QuantizedFuseRecord)
    if not record.worst_error_of_bound <= 1.0:
        raise ModelFuseError(
            f"layer {name!r}: the requantized weight is {record.worst_error_of_bound:.3g} "
            f"times its block bound away from the float32 merge somewhere; the fuse is "
            f"wrong (a bug). Please report it",
            problems=[(name, f"error {record.worst_error_of_bound:.3g} of its bound")],
        )
    return record


def _compare(
    original: torch.Tensor,
    base: torch.Tensor,
    written: tuple[torch.Tensor, QuantizedFuseRecord | None],
    export: _Export,
    pairs: list[tuple[LoraAdapter, float]],
    scale: float,
    name: str,
) -> base_quant.QloraComparison:
    """The written merge and the two others it could have been, against the output the
    adapters were trained to give (on ``export.reference``'s dequantized base).

    ``written`` is the merged weight's values and, when it was written quantized, its
    record. A 16-bit export's requantized alternative is the guarded fuse into
    ``quant(W)`` with the reference settings, the QLoRA base itself.
    """
    dtype = original.dtype
    reference = base
    if export.base_quant is None:
        reference = dequantized(quantized_linear(original, export.reference), name).to(dtype)
    delta = torch.zeros(original.shape, dtype=torch.float32)
    for (adapter, _), coefficient in zip(pairs, coefficients_of(pairs, scale), strict=True):
        delta += coefficient * (adapter.lora_B.float() @ adapter.lora_A.float())
    values, record = written
    choices = {
        "16bit": (original.float() + delta).to(dtype),
        "16bit_dequantized": (reference.float() + delta).to(dtype),
    }
    if record is None:
        layer = quantized_linear(original, export.reference)
        record = _fused_quantized(layer, pairs, scale, name)
        choices["quantized"] = dequantized(layer, name)
    choices[export.written_choice] = values
    # A quantized layer computes with its weight dequantized into the model's dtype, the
    # way the reference is taken: compare like with like.
    choices["quantized"] = choices["quantized"].to(dtype)
    return base_quant.compare(
        reference,
        pairs,
        scale,
        choices,
        reference_name=export.reference.describe(),
        written=export.written_choice,
        blocks=record.blocks,
        blocks_unchanged=record.blocks - record.blocks_changed,
    )


def quant_specs(
    quant: str | None, base_quant: str | None, *, blocksize: int = 64, nested: bool = False
) -> tuple[QuantSpec | None, QuantSpec | None]:
    """``(quant, base_quant)`` settings from the command line's names; ``blocksize`` and
    ``nested`` apply to the 4-bit ones (int8 quantizes whole rows)."""

    def spec(quant_type: str | None) -> QuantSpec | None:
        if quant_type is None:
            return None
        if quant_type == "int8":
            return QuantSpec(quant_type)
        return QuantSpec(quant_type, blocksize, nested)

    return spec(quant), spec(base_quant)


def qlora_overall(report: ModelFuseReport) -> dict[str, float | int] | None:
    """The whole model's QLoRA comparison (:func:`base_quant.overall`); None without one."""
    layers = [layer.qlora for layer in report.layers if layer.qlora is not None]
    return base_quant.overall(layers) if layers else None


def qlora_summary(report: ModelFuseReport) -> str | None:
    """The QLoRA comparison table for the command line; None when there is none."""
    layers = [(layer.name, layer.qlora) for layer in report.layers if layer.qlora is not None]
    return base_quant.summary(layers) if layers else None
