"""Fuse adapter sets into a ``torch.nn.Module`` in memory: every adapted layer, or none.

:func:`fuse_model` fuses every adapted layer and, if any layer fails (a refusal, any
exception, a KeyboardInterrupt), unfuses the layers already fused, exactly and in reverse
order, so every parameter is bit for bit what it was.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import torch
from torch import nn

from safemerge.errors import (
    AdapterConfigError,
    ModelFuseError,
    SafemergeError,
    UnsupportedLayerError,
)
from safemerge.io.adapter_formats import AdapterSet
from safemerge.layer import fuse, unfuse
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.layer_check import BoundCheck
from safemerge.merge.record import FuseRecord
from safemerge.merge.request import check_request
from safemerge.merge.view import LayerView, view_layer
from safemerge.model.report import ModelFuseReport, TensorResult
from safemerge.model.transaction import (
    check_scale,
    checked_against_bound,
    finite_weight,
    interrupts_deferred,
    plan_error,
    roll_back,
    shared_weight,
    tensor_owners,
)
from safemerge.quant import bnb
from safemerge.quant.quantized import QuantizedFuseRecord

#: Adapters for :func:`fuse_model`: loaded sets, each optionally with its weight.
AdapterSets: TypeAlias = Sequence[AdapterSet | tuple[AdapterSet, float]]


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
    results: list[TensorResult] = []
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
                else checked_against_bound(check, record, name)
            )
            results.append(
                TensorResult(
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


def _requests(adapters: AdapterSets, scale: float) -> dict[str, list[tuple[LoraAdapter, float]]]:
    """Per weight name, every ``(adapter, weight)`` to fuse into it, in the sets' order."""
    check_scale(scale)
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
            pairs.append((item[0], finite_weight(item[1], position)))
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
        raise plan_error(problems, None, f"the model ({type(module).__name__}) was not changed")
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


def _held_dtype(layer: nn.Module, record: FuseRecord | QuantizedFuseRecord) -> torch.dtype:
    if isinstance(record, FuseRecord):
        return record.dtype
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.uint8
