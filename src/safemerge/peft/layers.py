"""PEFT's LoRA layers seen as safemerge layers: which adapters each merges, and what refuses.

:func:`plan_merge` walks a model once and, before anything is changed, turns every PEFT
LoRA layer that has adapters to merge into a :class:`PeftLayer`: the base layer to fuse
into and, per adapter, a :class:`safemerge.LoraAdapter` over PEFT's own tensors (no
copies) with PEFT's ``scaling`` as its weight. ``scaling`` already holds ``lora_alpha / r``
(or ``/ sqrt(r)`` with rsLoRA), ``alpha_pattern``/``rank_pattern`` and any
``set_scale``, so the merge is exactly what PEFT's forward computes. Everything that
cannot be merged is collected, for one error that lists it all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safemerge.errors import AdapterConfigError, UnsupportedLayerError
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.request import check_request
from safemerge.merge.view import LayerView, view_layer
from safemerge.model.transaction import plan_error, shared_weight, tensor_owners
from safemerge.quant import bnb


@dataclass(frozen=True, eq=False)
class PeftLayer:
    """One PEFT LoRA layer and the adapters a merge adds to its base layer.

    Attributes:
        name: the LoRA layer's module name in the model.
        lora_layer: PEFT's layer (``peft.tuners.lora.Linear`` and the like).
        base: the layer it wraps, whose weight and bias the merge changes.
        adapter_names: the PEFT adapters merged, in PEFT's order.
        pairs: ``(adapter, scaling)`` per adapter name.
    """

    name: str
    lora_layer: Any
    base: nn.Module
    adapter_names: tuple[str, ...]
    pairs: tuple[tuple[LoraAdapter, float], ...]

    @property
    def weight_name(self) -> str:
        """The weight's name in the merged (unloaded) model: what messages call it."""
        return f"{self.name}.weight"

    @property
    def is_dora(self) -> bool:
        return any(adapter.is_dora for adapter, _ in self.pairs)


def lora_tuner(model: Any) -> Any:
    """The ``LoraModel`` behind ``model`` (a ``PeftModel`` or a ``LoraModel``).

    Raises:
        UnsupportedLayerError: ``model`` is neither, or its tuner is not LoRA.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    tuner = model.base_model if isinstance(model, PeftModel) else model
    if isinstance(tuner, LoraModel):
        return tuner
    kind = type(tuner).__name__ if isinstance(model, PeftModel) else type(model).__name__
    raise UnsupportedLayerError(
        f"safemerge.peft merges LoRA adapters of a peft.PeftModel or peft.LoraModel; got a "
        f"{kind}. For other PEFT methods (LoHa, LoKr, IA3, ...) use PEFT's own "
        f"merge_and_unload; for a plain module use safemerge.fuse_model"
    )


@dataclass(frozen=True)
class LayerPlan:
    """What a merge of one model (or one pipeline component) would do, before any change.

    Attributes:
        layers: the LoRA layers with adapters to merge, in module order.
        problems: ``(layer name, what is wrong)`` for every layer that cannot be merged.
        adapters: every adapter name some LoRA layer of the model holds.
    """

    layers: list[PeftLayer]
    problems: list[tuple[str, str]]
    adapters: set[str]


def plan_merge(model: nn.Module, adapter_names: Sequence[str] | None) -> list[PeftLayer]:
    """Every LoRA layer of ``model`` with adapters to merge, checked, in module order.

    ``adapter_names`` None means each layer's active adapters (PEFT's default); adapters a
    layer has already merged are left out, as PEFT's ``merge`` does.

    Raises:
        ModelFuseError: listing every layer that cannot be merged (an unsupported LoRA
            layer class or variant, DoRA on a quantized layer or beside other adapters,
            a grouped convolution, a tied or offloaded weight, an adapter that does not
            fit), or an adapter name no layer has. Nothing was changed.
    """
    plan = collect_plan(model, adapter_names)
    problems = [*plan.problems, *unknown_adapters(adapter_names, plan.adapters)]
    if problems:
        raise plan_error(problems, None, f"the model ({type(model).__name__}) was not changed")
    return plan.layers


def collect_plan(
    model: nn.Module, adapter_names: Sequence[str] | None, *, prefix: str = ""
) -> LayerPlan:
    """Check every LoRA layer of ``model``, collecting problems instead of raising.

    Args:
        model: the module to walk.
        adapter_names: as for :func:`plan_merge`.
        prefix: put before every layer name (``"unet."``), so that the layers of several
            models merged together are told apart in messages and records.
    """
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names must be a list of names, got the string {adapter_names!r}")
    problems: list[tuple[str, str]] = []
    planned: list[PeftLayer] = []
    known: set[str] = set()
    owners = tensor_owners(model)
    for local_name, module in _tuner_layers(model):
        name = prefix + local_name
        problem = _unsupported_class(module)
        if problem is not None:
            problems.append((name, problem))
            continue
        known.update(_adapters_of(module))
        wanted = list(module.active_adapters) if adapter_names is None else list(adapter_names)
        merged = set(module.merged_adapters)
        names = [a for a in wanted if a in _adapters_of(module) and a not in merged]
        if not names:
            continue
        try:
            layer = _planned(name, module, names)
            _check_layer(layer, owners)
        except (AdapterConfigError, UnsupportedLayerError) as error:
            problems.append((name, str(error)))
            continue
        planned.append(layer)
    return LayerPlan(planned, problems, known)


def unknown_adapters(
    adapter_names: Sequence[str] | None, known: set[str], *, where: str = "(model)"
) -> list[tuple[str, str]]:
    """The problem to report when ``adapter_names`` names an adapter no LoRA layer has."""
    unknown = [a for a in adapter_names or () if a not in known]
    if not unknown:
        return []
    return [(where, f"no LoRA layer has the adapter(s) {unknown}; it has {sorted(known)}")]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """Every PEFT tuner layer of ``model`` with its name (LoRA or not)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def _tuner_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """Every PEFT tuner layer (not only LoRA ones: the others are refused by class)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            # Unloading keeps the trained copy; a LoRA layer inside it would be dropped.
            if any(isinstance(m, BaseTunerLayer) for m in module.modules_to_save.modules()):
                yield name, module
        elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            yield name, module


def _supported_classes() -> dict[type, str]:
    from peft.tuners.lora import layer as lora_layer

    classes: dict[type, str] = {
        lora_layer.Linear: "Linear",
        lora_layer.Embedding: "Embedding",
        lora_layer.Conv1d: "Conv1d",
        lora_layer.Conv2d: "Conv2d",
        lora_layer.Conv3d: "Conv3d",
    }
    try:
        from peft.tuners.lora import bnb as lora_bnb

        classes[lora_bnb.Linear8bitLt] = "Linear8bitLt"
        classes[lora_bnb.Linear4bit] = "Linear4bit"
    except (ImportError, AttributeError):  # bitsandbytes not installed
        pass
    return classes


def _unsupported_class(module: nn.Module) -> str | None:
    if type(module) in _supported_classes():
        return None
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        return (
            "a modules_to_save copy that holds LoRA layers itself is not merged by "
            "safemerge.peft; use PEFT's merge_and_unload"
        )
    supported = ", ".join(sorted(_supported_classes().values()))
    return (
        f"{type(module).__module__}.{type(module).__name__} is not a LoRA layer safemerge.peft "
        f"merges (it merges PEFT's LoRA {supported}); nothing was changed. Use PEFT's own "
        f"merge for this model, or leave this module out of the adapter's target_modules"
    )


def _adapters_of(module: Any) -> list[str]:
    if hasattr(module, "lora_embedding_A"):
        return [*module.lora_A.keys(), *module.lora_embedding_A.keys()]
    return list(module.lora_A.keys())


def _planned(name: str, module: Any, names: list[str]) -> PeftLayer:
    pairs = tuple(
        (_adapter(module, adapter_name), float(module.scaling[adapter_name]))
        for adapter_name in names
    )
    return PeftLayer(name, module, module.get_base_layer(), tuple(names), pairs)


def _adapter(module: Any, adapter_name: str) -> LoraAdapter:
    """PEFT's tensors for one adapter, as a LoraAdapter of scale 1 (the weight is ``scaling``)."""
    _check_variant(module, adapter_name)
    if adapter_name in getattr(module, "lora_embedding_A", {}):
        lora_A = module.lora_embedding_A[adapter_name]
        lora_B = module.lora_embedding_B[adapter_name]
        bias = None
        fan_in_fan_out = False
    else:
        lora_A = module.lora_A[adapter_name].weight
        lora_B = module.lora_B[adapter_name].weight
        has_bias = module.lora_bias.get(adapter_name, False)
        bias = module.lora_B[adapter_name].bias if has_bias else None
        fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
    magnitude = None
    if adapter_name in module.lora_magnitude_vector:
        magnitude = module.lora_magnitude_vector[adapter_name].weight
    return LoraAdapter(
        lora_A, lora_B, lora_bias=bias, magnitude=magnitude, fan_in_fan_out=fan_in_fan_out
    )


def _check_variant(module: Any, adapter_name: str) -> None:
    from peft.tuners.lora import variants

    variant = getattr(module, "lora_variant", {}).get(adapter_name)
    dora = (variants.DoraLinearVariant, variants._DoraConvNdVariant)
    if variant is None or isinstance(variant, dora):
        return
    raise UnsupportedLayerError(
        f"adapter {adapter_name!r} is a {type(variant).__name__} LoRA variant; safemerge.peft "
        f"merges plain LoRA and DoRA only (use PEFT's own merge for this one)"
    )


def _check_layer(layer: PeftLayer, owners: dict[int, list[str]]) -> None:
    """Raise for anything that keeps ``layer`` from merging, before anything changes."""
    module = layer.lora_layer
    if module.merged_adapters and layer.is_dora:
        raise UnsupportedLayerError(
            f"adapters {module.merged_adapters} are already merged into this layer: merging "
            f"a DoRA adapter on top is not supported (see below); unmerge them first"
        )
    if len(layer.pairs) > 1 and layer.is_dora:
        raise UnsupportedLayerError(
            f"DoRA adapter(s) merged together with others ({list(layer.adapter_names)}): PEFT "
            f"takes each DoRA norm over the base weight without the other adapters and applies "
            f"it to the weight with them, which safemerge's fuse does not reproduce; merge one DoRA adapter alone"
        )
    tensors = [t for adapter, _ in layer.pairs for t in _tensors(adapter)]
    if any(tensor.device.type == "meta" for tensor in [*tensors, *layer.base.parameters()]):
        raise UnsupportedLayerError(
            "the layer or its adapter is on the meta device (offloaded by accelerate?); "
            "load the model fully into memory before merging"
        )
    if layer.is_dora and bnb.is_bnb_layer(layer.base):
        raise UnsupportedLayerError("DoRA adapters are not merged into quantized layers")
    view = layer_view(layer)
    if not bnb.is_bnb_layer(layer.base):
        shared = shared_weight(layer.base, layer.weight_name, owners)
        if shared is not None:
            raise UnsupportedLayerError(shared)
    check_request(view, list(layer.pairs), 1.0)


def layer_view(layer: PeftLayer) -> LayerView:
    """The base layer as a LayerView; a bitsandbytes layer's weight is a meta tensor of its
    logical shape (its adapters' factors need the shape only, not the dequantized values)."""
    quantized_format = bnb.format_of(layer.base, layer.weight_name)
    if quantized_format is None:
        return view_layer(layer.base, layer.weight_name)
    bias = getattr(layer.base, "bias", None)
    return LayerView(
        layer.weight_name,
        quantized_format.kind,
        torch.empty(quantized_format.shape, device="meta"),
        bias if isinstance(bias, torch.Tensor) else None,
        quantized_format.shape,
        False,
    )


def _tensors(adapter: LoraAdapter) -> list[torch.Tensor]:
    optional = (adapter.lora_bias, adapter.magnitude)
    return [adapter.lora_A, adapter.lora_B, *(t for t in optional if t is not None)]
