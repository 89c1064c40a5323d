"""``fuse_lora`` / ``unfuse_lora`` for diffusers pipelines: guarded, all or nothing across
every component, and exactly reversible.

diffusers' own ``pipe.fuse_lora(lora_scale=s)`` does, per component and per PEFT LoRA layer,
``layer.scale_layer(s)`` (each active adapter's ``scaling *= s``) and then PEFT's
``layer.merge(adapter_names)``; ``unfuse_lora`` subtracts again and leaves ``scaling``
multiplied. Here the same layers are scaled the same way (PEFT's own ``scale_layer``, so the
coefficient is bit for bit the one diffusers merges with), planned across all components
before anything changes, merged in float32 through safemerge's guard with each layer's
exact-unfuse correction kept (:mod:`safemerge.peft.exact`), and marked merged as PEFT and
diffusers mark them. :func:`unfuse_lora` restores every base bit and every ``scaling``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safemerge.diffusers.components import (
    Component,
    holds_lora_layers,
    is_pipeline,
    loadable_components,
    merged_adapters,
    selected_components,
)
from safemerge.errors import RestoreError
from safemerge.model.report import ModelFuseReport
from safemerge.model.transaction import check_scale, interrupts_deferred, plan_error
from safemerge.peft.exact import changed_since_merge, merge_layers, merged_layers, undo_merges
from safemerge.peft.layers import PeftLayer, collect_plan, lora_layers, unknown_adapters

#: Where ``offload_adapters=True`` puts the fused adapters' tensors (as diffusers' legacy
#: fuse did, to free accelerator memory while they are not needed).
OFFLOAD_DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class _Saved:
    """What one fuse changed in one LoRA layer besides its base weights.

    Attributes:
        scaling: the layer's ``scaling`` before the fuse multiplied it by ``lora_scale``.
        offloaded: each fused adapter tensor moved to :data:`OFFLOAD_DEVICE`, with the
            device it came from.
    """

    scaling: dict[str, float]
    offloaded: tuple[tuple[torch.Tensor, torch.device], ...]


#: Per LoRA layer, what each :func:`fuse_lora` saved, oldest first. Keyed weakly: a layer
#: removed by ``unload_lora_weights`` takes its saved state with it.
_SAVED: weakref.WeakKeyDictionary[nn.Module, list[_Saved]] = weakref.WeakKeyDictionary()


def fuse_lora(
    pipe_or_model: Any,
    *,
    lora_scale: float = 1.0,
    components: Sequence[str] | None = None,
    adapter_names: Sequence[str] | str | None = None,
    offload_adapters: bool = False,
) -> ModelFuseReport:
    """Fuse LoRA adapters into a pipeline's (or one model's) weights, as diffusers'
    ``fuse_lora`` does, but guarded, all or nothing, and exactly reversible.

    Each fused weight is ``cast(W + sum_a scaling_a * lora_scale * B_a @ A_a)`` computed in
    float32: ``scaling_a`` is what the layer holds (``lora_alpha / r`` times any
    ``set_adapters`` weight) and, as in diffusers, ``lora_scale`` multiplies the *active*
    adapters' ``scaling`` (an inactive adapter named in ``adapter_names`` is fused with its
    scaling as it is). The layers stay attached, marked merged (``merged_adapters``), and
    the pipeline's ``fused_loras`` / ``num_fused_loras`` count them, so forward passes use
    the fused weights and diffusers' ``unload_lora_weights`` keeps them.

    Args:
        pipe_or_model: a diffusers ``DiffusionPipeline``, or one model (a diffusers
            ``ModelMixin`` or a transformers text encoder) holding PEFT LoRA layers.
        lora_scale: multiplies the active adapters' scaling; any finite value.
        components: the pipeline's components to fuse (``["unet", "text_encoder"]``);
            None: every LoRA-loadable component that holds LoRA layers.
        adapter_names: the adapters to fuse; None: each layer's active adapters. Adapters
            already fused are not fused again.
        offload_adapters: move the fused adapters' tensors to the CPU until
            :func:`unfuse_lora` brings them back (on a CPU-only machine nothing moves).

    Returns:
        A report per fused weight, with the exact-unfuse corrections' sizes.

    Raises:
        ModelFuseError: before any change, listing every problem in every component (a
            LoRA layer or variant safemerge does not fuse, a tied or offloaded weight, an
            adapter name no layer has, a component the pipeline does not have).
        NonFiniteMergeError: some weight's merge would not be finite (it names the layer,
            ``"text_encoder.encoder.layers.0.self_attn.q_proj.weight"``); every
            component is as it was, bit for bit, scaling included.
    """
    check_scale(lora_scale)
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    selected = selected_components(pipe_or_model, components)
    if not any(holds_lora_layers(component.model) for component in selected):
        raise plan_error([(_described(pipe_or_model), _NO_LORA)], None, "nothing was changed")
    with interrupts_deferred():  # scaled, merged and recorded together, or not at all
        before = {layer: dict(layer.scaling) for layer in _scalable_layers(selected)}
        try:
            for layer in before:
                layer.scale_layer(lora_scale)  # PEFT's own, as diffusers calls it
            planned = _plan(selected, adapter_names)
            report = merge_layers(planned)
        except BaseException:
            for layer, scaling in before.items():
                layer.scaling.update(scaling)
            raise
        offloaded = _offload(planned) if offload_adapters else {}
        for layer, scaling in before.items():
            saved = _Saved(scaling, tuple(offloaded.get(layer, ())))
            _SAVED.setdefault(layer, []).append(saved)
        if is_pipeline(pipe_or_model):
            pipe_or_model._merged_adapters = set(pipe_or_model._merged_adapters) | (
                merged_adapters(selected)
            )
    return report


def unfuse_lora(pipe_or_model: Any, *, components: Sequence[str] | None = None) -> None:
    """Undo every :func:`fuse_lora` of the components: every base bit, every adapter's
    ``scaling`` and device, as they were before the first fuse.

    Adapters fused by diffusers' own ``fuse_lora`` are left as they are (undo them with
    ``pipe.unfuse_lora()``).

    Args:
        pipe_or_model: the pipeline or model given to :func:`fuse_lora`.
        components: the components to unfuse; None: every one holding LoRA layers.

    Raises:
        RestoreError: before any change, when a fused layer changed since the fuse
            (diffusers' or PEFT's own unfuse or merge on it, a training step), naming
            every such layer.
    """
    selected = selected_components(pipe_or_model, components)
    fused = [pair for component in selected for pair in _fused_layers(component)]
    changed = changed_since_merge(fused)
    if changed:
        raise RestoreError(
            f"cannot unfuse exactly: {len(changed)} layer(s) changed since safemerge fused "
            f"them ({changed[:5]}); nothing was unfused. diffusers' or PEFT's own "
            f"unfuse_lora/merge, or a training step, touched them: reload the pipeline instead"
        )
    with interrupts_deferred():
        layers = [layer for component in selected for _, layer in lora_layers(component.model)]
        for layer in layers:  # the adapters first: an exact unfuse recomputes their delta
            for saved in _SAVED.get(layer, ()):
                for tensor, device in saved.offloaded:
                    tensor.data = tensor.data.to(device)
        undo_merges(fused)
        for layer in layers:
            for saved in reversed(_SAVED.pop(layer, [])):
                layer.scaling.update(saved.scaling)
        if is_pipeline(pipe_or_model):
            still_merged = merged_adapters(loadable_components(pipe_or_model))
            pipe_or_model._merged_adapters = set(pipe_or_model._merged_adapters) & still_merged


_NO_LORA = (
    "no LoRA layers to fuse: load adapters first (pipe.load_lora_weights(...), or PEFT's "
    "add_adapter), or name the components that hold them"
)


def _described(pipe_or_model: Any) -> str:
    return f"({type(pipe_or_model).__name__})"


def _scalable_layers(selected: Sequence[Component]) -> Iterator[Any]:
    """Every tuner layer diffusers' fuse would scale: those with PEFT's ``scale_layer``."""
    for component in selected:
        for _, layer in lora_layers(component.model):
            if hasattr(layer, "scale_layer") and isinstance(getattr(layer, "scaling", None), dict):
                yield layer


def _plan(selected: Sequence[Component], adapter_names: Sequence[str] | None) -> list[PeftLayer]:
    """Every component's layers to merge, or one error listing every component's problems."""
    planned: list[PeftLayer] = []
    problems: list[tuple[str, str]] = []
    known: set[str] = set()
    for component in selected:
        plan = collect_plan(component.model, adapter_names, prefix=component.prefix)
        planned.extend(plan.layers)
        problems.extend(plan.problems)
        known |= plan.adapters
    problems.extend(unknown_adapters(adapter_names, known, where="(components)"))
    if problems:
        names = [component.name or type(component.model).__name__ for component in selected]
        raise plan_error(problems, None, f"nothing was changed in {names}")
    return planned


def _fused_layers(component: Component) -> list[tuple[str, Any]]:
    return merged_layers(component.model, prefix=component.prefix)


def _offload(planned: Sequence[PeftLayer]) -> dict[Any, list[tuple[torch.Tensor, torch.device]]]:
    """Move each fused adapter's tensors to :data:`OFFLOAD_DEVICE`; say where each was."""
    moved: dict[Any, list[tuple[torch.Tensor, torch.device]]] = {}
    for layer in planned:
        for tensor in _adapter_tensors(layer.lora_layer, layer.adapter_names):
            moved.setdefault(layer.lora_layer, []).append((tensor, tensor.device))
            # In place on the Parameter: PEFT's modules and safemerge's records hold it.
            tensor.data = tensor.data.to(OFFLOAD_DEVICE)
    return moved


def _adapter_tensors(lora_layer: Any, adapter_names: Sequence[str]) -> Iterator[torch.Tensor]:
    """The parameters of the named adapters in one LoRA layer (factors, bias, magnitude)."""
    for name in adapter_names:
        for container in ("lora_A", "lora_B", "lora_magnitude_vector"):
            modules = getattr(lora_layer, container, {})
            if name in modules:
                yield from modules[name].parameters()
        for container in ("lora_embedding_A", "lora_embedding_B"):
            parameters = getattr(lora_layer, container, {})
            if name in parameters:
                yield parameters[name]
