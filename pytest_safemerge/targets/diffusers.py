"""diffusers' own LoRA fuse and unfuse, in the contracts of safemerge's conformance suite.

``pytest --safemerge-impl=pytest_safemerge.targets.diffusers:DIFFUSERS_PEFT`` runs the suite
against diffusers' PEFT-backend path, the one every diffusers model and pipeline takes: the
layer under test sits in a diffusers ``ModelMixin`` (with ``PeftAdapterMixin``, as
``UNet2DConditionModel`` and the transformers of Flux and SD3 are), each
:class:`~safemerge.LoraAdapter` is loaded by ``load_lora_adapter`` from a state dict and
its metadata (the LoRA format ``save_lora_adapter`` writes), its tensors then put in as
they are (same storage and dtype: diffusers itself would cast them to the base's dtype),
several adapters are activated by ``set_adapters``, and ``fuse_lora(lora_scale=scale,
safe_fusing=True, adapter_names=...)`` and ``unfuse_lora()`` do the work.
``...:DIFFUSERS_LEGACY`` (:mod:`pytest_safemerge.targets.diffusers_legacy`) runs it against
the older ``LoRACompatibleLinear`` / ``LoRACompatibleConv`` path. Nothing here corrects
diffusers (or the PEFT code it calls): what they get wrong, the suite sees.

Two contracts (``docs/design.md``, "The plugin's contracts"):

- tensor level: ``fuse(weight, lora_A, lora_B, scale)`` returns the merged weight (the
  safe merge computes into a copy and swaps it in, so the weight passed is not written);
  ``unfuse`` is ``unfuse_lora()`` on the same model, arithmetic (``exact_unfuse = False``);
- module level: ``fuse_layer(layer, adapters, scale)`` merges into ``layer`` in place (the
  model holds ``layer`` as the LoRA layer's base layer, so diffusers writes it directly);
  ``unfuse_layer`` is ``unfuse_lora()``; ``layer_kinds`` names what diffusers' models have.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_safemerge.targets.diffusers_legacy import DIFFUSERS_LEGACY, DiffusersLegacyFuse
from pytest_safemerge.targets.diffusers_support import import_diffusers, quiet
from pytest_safemerge.targets.identity import ByIdentity
from safemerge.merge.adapter import LoraAdapter

__all__ = [
    "DIFFUSERS_LEGACY",
    "DIFFUSERS_PEFT",
    "PEFT_LAYER_KINDS",
    "DiffusersLegacyFuse",
    "DiffusersPeftFuse",
    "model_with",
]

#: The layer kinds diffusers' models hold and its LoRA loading targets (Linear projections,
#: Conv1d/2d/3d of audio, image and video models), with the options diffusers loads
#: (``lora_B.bias``, DoRA's ``lora_magnitude_vector``, several named adapters). Not
#: declared: embeddings and transposed weights (no diffusers LoRA format targets them),
#: bitsandbytes layers (not covered here yet).
PEFT_LAYER_KINDS = frozenset(
    {"linear", "conv1d", "conv2d", "conv3d", "lora-bias", "dora", "several"}
)
#: The weight dtypes diffusers fuses LoRAs into (its models run in these).
DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
#: The attribute of the model that holds the layer under test, and the LoRA target.
TARGET = "layer"


@functools.cache
def _model_class() -> type[nn.Module]:
    """A diffusers model class holding one layer: ``ModelMixin`` with ``PeftAdapterMixin``,
    the bases of every diffusers model that takes LoRAs."""
    diffusers = import_diffusers()
    loaders = import_diffusers("diffusers.loaders")

    class LayerModel(diffusers.ModelMixin, loaders.PeftAdapterMixin):  # type: ignore[misc, name-defined]
        """A diffusers model whose only module is the layer under test."""

        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            setattr(self, TARGET, layer)

    return LayerModel


def adapter_name(index: int) -> str:
    return f"adapter_{index}"


def _metadata(adapter: LoraAdapter) -> dict[str, Any]:
    """The LoRA config ``save_lora_adapter`` stores beside the tensors, which
    ``load_lora_adapter`` builds its ``LoraConfig`` from."""
    return {
        "r": adapter.rank,
        "lora_alpha": float(adapter.rank if adapter.alpha is None else adapter.alpha),
        "use_rslora": adapter.use_rslora,
        "use_dora": adapter.is_dora,
        "lora_bias": adapter.lora_bias is not None,
        "target_modules": [TARGET],
    }


def _state_dict(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys of diffusers' PEFT-format LoRA files."""
    state = {
        f"{TARGET}.lora_A.weight": adapter.lora_A.detach(),
        f"{TARGET}.lora_B.weight": adapter.lora_B.detach(),
    }
    if adapter.lora_bias is not None:
        state[f"{TARGET}.lora_B.bias"] = adapter.lora_bias.detach().reshape(-1)
    return state


def _put_as_they_are(lora_layer: Any, name: str, adapter: LoraAdapter) -> None:
    """Replace what loading copied into adapter ``name`` (cast to the base's dtype) by the
    adapter's own tensors: same storage, dtype and strides."""

    def frozen(tensor: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(tensor.detach(), requires_grad=False)

    lora_layer.lora_A[name].weight = frozen(adapter.lora_A)
    lora_layer.lora_B[name].weight = frozen(adapter.lora_B)
    if adapter.lora_bias is not None:
        lora_layer.lora_B[name].bias = frozen(adapter.lora_bias.reshape(-1))
    if adapter.magnitude is not None:
        dora = lora_layer.lora_magnitude_vector[name]
        dora.weight = frozen(adapter.magnitude.reshape(dora.weight.shape))


def model_with(layer: nn.Module, adapters: Sequence[LoraAdapter]) -> Any:
    """A diffusers model holding ``layer``, with one adapter per :class:`LoraAdapter`
    loaded by ``load_lora_adapter`` and activated by ``set_adapters``, as a user would.

    Raises:
        TypeError: PEFT has no LoRA layer for ``layer``'s kind.
    """
    if not adapters:
        raise ValueError("fuse_layer needs at least one adapter")
    if any(adapter.fan_in_fan_out for adapter in adapters):
        raise TypeError("diffusers' LoRA formats have no transposed (fan_in_fan_out) weight")
    model: Any = _model_class()(layer)
    names = [adapter_name(index) for index in range(len(adapters))]
    # Loading freezes the base (PEFT's injection marks only the adapters trainable): a side
    # effect of the load, not of the fuse under test, so the layer's flags are put back.
    trainable = {name: p.requires_grad for name, p in layer.named_parameters()}
    with quiet():
        for name, adapter in zip(names, adapters, strict=True):
            model.load_lora_adapter(
                _state_dict(adapter), prefix=None, adapter_name=name, metadata=_metadata(adapter)
            )
        model.set_adapters(names)
    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(trainable[name])
    lora_layer = getattr(model, TARGET)
    for name, adapter in zip(names, adapters, strict=True):
        _put_as_they_are(lora_layer, name, adapter)
    return model


@dataclass
class _Fused:
    """A model that fused adapters into a layer, kept for its ``unfuse_lora``."""

    model: Any
    adapters: tuple[LoraAdapter, ...]


class DiffusersPeftFuse:
    """diffusers' ``fuse_lora(safe_fusing=True)`` / ``unfuse_lora()`` (PEFT backend) as an
    implementation under test.

    Stateful only to find, at unfuse time, the model that fused: ``unfuse_lora`` unmerges
    with the scaling that fuse left on each LoRA layer (and DoRA with the norm it cached).
    """

    #: ``unfuse_lora`` subtracts the delta again: not bit-exact.
    exact_unfuse = False
    layer_kinds = PEFT_LAYER_KINDS
    dtypes = DTYPES

    def __init__(self) -> None:
        self._weights: ByIdentity[torch.Tensor, _Fused] = ByIdentity()
        self._layers: ByIdentity[nn.Module, _Fused] = ByIdentity()

    # The tensor contract.

    def fuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``weight + scale * lora_B @ lora_A`` by ``fuse_lora(lora_scale=scale)`` on a model
        holding an ``nn.Linear`` whose weight Parameter wraps ``weight`` (same storage), the
        adapter's alpha equal to its rank (its own scale 1).

        Returns:
            The merged weight: a new tensor (the safe merge swaps a merged copy in).

        Raises:
            ValueError: the fuse was refused.
        """
        adapter = LoraAdapter(lora_A, lora_B)
        model = model_with(_linear_around(weight), [adapter])
        _fuse(model, scale, 1)
        merged: torch.Tensor = getattr(model, TARGET).get_base_layer().weight.detach()
        self._weights.put(merged, _Fused(model, (adapter,)))
        return merged

    def unfuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``unfuse_lora()`` on the model whose fuse returned ``weight``, or on a new one
        around ``weight`` marked fused (as ``fuse_lora`` leaves it) for a weight fused
        elsewhere.

        Returns:
            The unfused weight (``weight`` itself, which the unmerge writes in place).
        """
        known = self._weights.get(weight)
        if known is not None and _same_factors(known.adapters[0], lora_A, lora_B):
            model = known.model
            self._weights.pop(weight)
        else:
            model = model_with(_linear_around(weight), [LoraAdapter(lora_A, lora_B)])
            _mark_fused(model, scale, 1)
        with quiet(), torch.no_grad():
            model.unfuse_lora()
        unfused: torch.Tensor = getattr(model, TARGET).get_base_layer().weight.detach()
        return unfused

    # The module-level contract.

    def fuse_layer(self, layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> None:
        """Fuse every adapter into ``layer``, in place, by ``fuse_lora(lora_scale=scale,
        safe_fusing=True, adapter_names=[all of them])`` on a model holding it.

        Raises:
            ValueError: the fuse was refused, or PEFT cannot hold the adapters.
            TypeError: ``layer`` is of a kind PEFT has no LoRA layer for.
        """
        adapters = tuple(adapters)
        model = model_with(layer, adapters)
        try:
            _fuse(model, scale, len(adapters))
        finally:
            # diffusers commits adapter by adapter: keep whatever it fused, for unfuse_layer.
            if getattr(model, TARGET).merged_adapters:
                self._layers.put(layer, _Fused(_detached(model, layer), adapters))

    def unfuse_layer(self, layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> None:
        """``unfuse_lora()`` on the model :meth:`fuse_layer` fused ``layer`` with (or, for a
        layer fused elsewhere, on a new one holding ``adapters``, marked fused).

        Raises:
            ValueError: a DoRA adapter fused elsewhere: the unmerge divides by the weight
                norm cached by the fuse of the same model.
        """
        adapters = tuple(adapters)
        known = self._layers.get(layer)
        if known is not None and _same(known.adapters, adapters):
            model = _reattached(known.model, layer)
            self._layers.pop(layer)
        else:
            if any(adapter.is_dora for adapter in adapters):
                raise ValueError(
                    "diffusers unfuses a DoRA adapter only on the model that fused it (the "
                    "unmerge divides by the weight norm cached then); fuse_layer it here first"
                )
            model = model_with(layer, adapters)
            _mark_fused(model, scale, len(adapters))
        with quiet(), torch.no_grad():
            model.unfuse_lora()


#: The implementation under test:
#: ``--safemerge-impl=pytest_safemerge.targets.diffusers:DIFFUSERS_PEFT``.
DIFFUSERS_PEFT = DiffusersPeftFuse()


def _fuse(model: Any, scale: float, count: int) -> None:
    names = [adapter_name(index) for index in range(count)]
    with quiet(), torch.no_grad():
        model.fuse_lora(lora_scale=scale, safe_fusing=True, adapter_names=names)


def _mark_fused(model: Any, scale: float, count: int) -> None:
    """Leave ``model`` as ``fuse_lora(lora_scale=scale)`` leaves a model whose weights hold
    the adapters already: each scaling multiplied by ``scale``, every adapter merged."""
    lora_layer = getattr(model, TARGET)
    lora_layer.scale_layer(scale)
    lora_layer.merged_adapters.extend(adapter_name(index) for index in range(count))


def _linear_around(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight Parameter wraps ``weight`` (same storage)."""
    out_features, in_features = (int(size) for size in weight.shape)
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def _same_factors(adapter: LoraAdapter, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    return adapter.lora_A is lora_A and adapter.lora_B is lora_B


def _same(first: Sequence[LoraAdapter], second: Sequence[LoraAdapter]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))


def _detached(model: Any, layer: nn.Module) -> Any:
    """``model``, kept until the unfuse, without ``layer`` as its LoRA layer's base: the
    map would otherwise keep ``layer`` alive forever (its value would own its key)."""
    lora_layer = getattr(model, TARGET)
    if lora_layer._modules.get("base_layer") is layer:
        lora_layer._modules["base_layer"] = None
    return model


def _reattached(model: Any, layer: nn.Module) -> Any:
    lora_layer = getattr(model, TARGET)
    if lora_layer._modules.get("base_layer") is None:
        lora_layer._modules["base_layer"] = layer
    return model
