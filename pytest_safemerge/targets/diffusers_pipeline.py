"""Pipeline-level checks of a LoRA fuse: all or nothing across a pipeline's components, and
an unfuse that gives the pipeline back.

A diffusers pipeline fuses its LoRAs component by component (``pipe.fuse_lora`` walks the
UNet or transformer, then each text encoder, layer by layer), so the suite's layer
contract cannot see what a refusal halfway leaves behind, nor what an unfuse fails to
restore outside the weights. These checks take a pipeline with LoRAs loaded and the fuse
(and unfuse) to run on it, and return a :class:`Verdict` saying what differs:

- :func:`check_fuse_atomicity`: the fuse must refuse (the caller broke one adapter, e.g.
  with :func:`plant_non_finite`) and leave every component as it was: every tensor (base
  weights, LoRA factors, buffers) bit for bit, every LoRA layer's scaling and merged
  adapters;
- :func:`check_unfuse_restores`: fuse then unfuse must give back every tensor bit for bit
  and every LoRA layer's scaling and merged adapters (the state a forward depends on).

Both default to diffusers' own ``pipe.fuse_lora(safe_fusing=True)`` and ``unfuse_lora()``;
any other fuse (safemerge's, yours) is a callable on the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pytest_safemerge.targets.diffusers_support import quiet

__all__ = [
    "DIFFUSERS_PIPELINE",
    "SAFEMERGE_PIPELINE",
    "DiffusersPipelineFuse",
    "PipelineState",
    "SafemergePipelineFuse",
    "Verdict",
    "check_fuse_atomicity",
    "check_unfuse_restores",
    "differences",
    "diffusers_fuse",
    "diffusers_unfuse",
    "load_random_lora",
    "lora_layers",
    "pipeline_state",
    "plant_non_finite",
]

#: How many names of changed tensors a difference lists before "and N more".
SHOWN = 3


@dataclass(frozen=True)
class ComponentState:
    """What a forward of one component depends on, copied.

    Attributes:
        tensors: a CPU copy of every parameter and buffer, by name.
        scalings: each LoRA layer's ``scaling`` (adapter -> factor), by layer name.
        merged: each LoRA layer's ``merged_adapters``, by layer name.
    """

    tensors: dict[str, torch.Tensor]
    scalings: dict[str, dict[str, float]]
    merged: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class PipelineState:
    """:class:`ComponentState` of every ``nn.Module`` component, by component name."""

    components: dict[str, ComponentState]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a pipeline check.

    Attributes:
        passed: whether the property holds.
        differences: what differs from the pipeline before, one line per component and
            kind of state (tensors, scalings, merged adapters), or what else went wrong.
        error: the exception the fuse raised (``"ValueError: ..."``), or None.
    """

    passed: bool
    differences: tuple[str, ...] = field(default=())
    error: str | None = None

    def __str__(self) -> str:
        head = "passed" if self.passed else "failed"
        raised = "" if self.error is None else f" (the fuse raised {self.error})"
        return "; ".join([f"{head}{raised}", *self.differences])


def lora_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """Every PEFT LoRA layer in ``module``, by name: modules with a ``scaling`` dict and a
    ``merged_adapters`` list (PEFT's ``LoraLayer``, through diffusers or transformers)."""
    for name, sub in module.named_modules():
        if isinstance(getattr(sub, "scaling", None), dict) and isinstance(
            getattr(sub, "merged_adapters", None), list
        ):
            yield name, sub


def _components(pipe: Any) -> Iterator[tuple[str, nn.Module]]:
    for name, component in sorted(pipe.components.items()):
        if isinstance(component, nn.Module):
            yield name, component


def pipeline_state(pipe: Any) -> PipelineState:
    """A copy of what every component's forward depends on (see :class:`ComponentState`)."""
    states = {}
    for name, component in _components(pipe):
        tensors = {
            key: tensor.detach().to("cpu", copy=True)
            for key, tensor in (
                *component.named_parameters(remove_duplicate=False),
                *component.named_buffers(remove_duplicate=False),
            )
        }
        layers = dict(lora_layers(component))
        states[name] = ComponentState(
            tensors,
            {key: dict(layer.scaling) for key, layer in layers.items()},
            {key: tuple(layer.merged_adapters) for key, layer in layers.items()},
        )
    return PipelineState(states)


def _same_bits(old: torch.Tensor, new: torch.Tensor) -> bool:
    if (old.shape, old.dtype) != (new.shape, new.dtype):
        return False
    return old.numel() == 0 or torch.equal(
        old.contiguous().reshape(-1).view(torch.uint8),
        new.contiguous().reshape(-1).view(torch.uint8),
    )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown} and {len(names) - SHOWN} more"


def differences(before: PipelineState, after: PipelineState) -> tuple[str, ...]:
    """One line per component and kind of state that differs between two states."""
    lines = []
    for component in sorted(before.components.keys() | after.components.keys()):
        old, new = before.components.get(component), after.components.get(component)
        if old is None or new is None:
            lines.append(f"{component}: {'appeared' if old is None else 'disappeared'}")
            continue
        changed = [
            key
            for key in sorted(old.tensors.keys() | new.tensors.keys())
            if key not in old.tensors
            or key not in new.tensors
            or not _same_bits(old.tensors[key], new.tensors[key])
        ]
        if changed:
            base = [key for key in changed if ".lora_" not in key]
            lines.append(
                f"{component}: {len(changed)} tensors differ ({len(base)} base, "
                f"{len(changed) - len(base)} LoRA): {_listed(changed)}"
            )
        scaled = [
            f"{key} {old.scalings[key]} -> {new.scalings.get(key)}"
            for key in sorted(old.scalings)
            if not _same_scalings(old.scalings[key], new.scalings.get(key))
        ]
        if scaled:
            lines.append(f"{component}: {len(scaled)} LoRA scalings differ: {_listed(scaled)}")
        merged = [
            f"{key} {list(old.merged[key])} -> {list(new.merged.get(key, ()))}"
            for key in sorted(old.merged)
            if old.merged[key] != new.merged.get(key)
        ]
        if merged:
            lines.append(
                f"{component}: {len(merged)} LoRA layers' merged adapters differ: {_listed(merged)}"
            )
    return tuple(lines)


def _same_scalings(old: dict[str, float], new: dict[str, float] | None) -> bool:
    """Equal factors (exactly: a scaling is a Python float, NaN never equal)."""
    return (
        new is not None
        and old.keys() == new.keys()
        and all(
            old[key] == new[key] or (math.isnan(old[key]) and math.isnan(new[key])) for key in old
        )
    )


def diffusers_fuse(lora_scale: float = 1.0, **kwargs: Any) -> Callable[[Any], None]:
    """diffusers' own ``pipe.fuse_lora(lora_scale=..., safe_fusing=True, **kwargs)``."""

    def fuse(pipe: Any) -> None:
        with quiet(), torch.no_grad():
            pipe.fuse_lora(lora_scale=lora_scale, safe_fusing=True, **kwargs)

    return fuse


def diffusers_unfuse(**kwargs: Any) -> Callable[[Any], None]:
    """diffusers' own ``pipe.unfuse_lora(**kwargs)``."""

    def unfuse(pipe: Any) -> None:
        with quiet(), torch.no_grad():
            pipe.unfuse_lora(**kwargs)

    return unfuse


def load_random_lora(
    pipe: Any,
    targets: dict[str, tuple[str, ...]],
    *,
    adapter_name: str = "style",
    rank: int = 4,
    seed: int = 0,
) -> int:
    """Load a random LoRA by ``pipe.load_lora_weights`` (diffusers' PEFT-format keys,
    ``"<component>.<module>.lora_A.weight"``) on every ``nn.Linear`` of each component
    whose name ends with one of its targets. Returns how many layers it targets."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for component, suffixes in targets.items():
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, nn.Linear) and name.endswith(suffixes):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, rank, generator=generator) * 0.1
                state[f"{component}.{name}.lora_A.weight"] = down
                state[f"{component}.{name}.lora_B.weight"] = up
    with quiet():
        pipe.load_lora_weights(state, adapter_name=adapter_name)
    return len(state) // 2


def plant_non_finite(pipe: Any, component: str, value: float = math.inf, *, layer: int = -1) -> str:
    """Put ``value`` into one element of ``lora_B`` of every adapter of one LoRA layer of
    ``component`` (its last by default: a fuse that commits layer by layer has then
    committed all the others), as a training blow-up would. Returns the layer's name.

    Raises:
        ValueError: the component holds no LoRA layer.
    """
    layers = list(lora_layers(getattr(pipe, component)))
    if not layers:
        raise ValueError(f"{component} holds no LoRA layer: load an adapter first")
    name, lora_layer = layers[layer]
    with torch.no_grad():
        for factor in lora_layer.lora_B.values():
            factor.weight.view(-1)[0] = value
    return f"{component}.{name}"


def check_fuse_atomicity(pipe: Any, fuse: Callable[[Any], None] | None = None) -> Verdict:
    """Run ``fuse`` (diffusers' ``pipe.fuse_lora(safe_fusing=True)`` by default) on a
    pipeline with a broken adapter: it must refuse, with every component as it was."""
    fuse = diffusers_fuse() if fuse is None else fuse
    before = pipeline_state(pipe)
    try:
        fuse(pipe)
    except Exception as error:  # the refusal due; its state is what is checked
        changed = differences(before, pipeline_state(pipe))
        return Verdict(not changed, changed, f"{type(error).__name__}: {error}")
    changed = differences(before, pipeline_state(pipe))
    return Verdict(False, ("the fuse did not refuse a broken adapter", *changed))


def check_unfuse_restores(
    pipe: Any,
    fuse: Callable[[Any], None] | None = None,
    unfuse: Callable[[Any], None] | None = None,
) -> Verdict:
    """Run ``fuse`` then ``unfuse`` (diffusers' ``fuse_lora(safe_fusing=True)`` and
    ``unfuse_lora()`` by default): every tensor, scaling and merged-adapter list must be
    as before the fuse."""
    fuse = diffusers_fuse() if fuse is None else fuse
    unfuse = diffusers_unfuse() if unfuse is None else unfuse
    before = pipeline_state(pipe)
    try:
        fuse(pipe)
    except Exception as error:  # nothing to unfuse: the check cannot run
        return Verdict(
            False, ("the fuse refused a sound adapter",), f"{type(error).__name__}: {error}"
        )
    if not differences(before, pipeline_state(pipe)):
        return Verdict(False, ("the fuse changed nothing: load a LoRA first",))
    unfuse(pipe)
    changed = differences(before, pipeline_state(pipe))
    return Verdict(not changed, changed)


# The pipeline suite's implementations (``--safemerge-pipeline=MODULE:OBJECT``): an object
# with ``fuse_lora(pipe, lora_scale=...)`` and ``unfuse_lora(pipe)``.


class DiffusersPipelineFuse:
    """diffusers' own ``pipe.fuse_lora(lora_scale=..., safe_fusing=True)`` and
    ``pipe.unfuse_lora()``, as the pipeline suite calls an implementation."""

    def fuse_lora(self, pipe: Any, lora_scale: float = 1.0) -> None:
        diffusers_fuse(lora_scale)(pipe)

    def unfuse_lora(self, pipe: Any) -> None:
        diffusers_unfuse()(pipe)


class SafemergePipelineFuse:
    """``safemerge.diffusers.fuse_lora`` / ``unfuse_lora``, as the pipeline suite calls an
    implementation."""

    def fuse_lora(self, pipe: Any, lora_scale: float = 1.0) -> None:
        import safemerge.diffusers

        safemerge.diffusers.fuse_lora(pipe, lora_scale=lora_scale)

    def unfuse_lora(self, pipe: Any) -> None:
        import safemerge.diffusers

        safemerge.diffusers.unfuse_lora(pipe)


#: ``--safemerge-pipeline=pytest_safemerge.targets.diffusers_pipeline:DIFFUSERS_PIPELINE``.
DIFFUSERS_PIPELINE = DiffusersPipelineFuse()
#: ``--safemerge-pipeline=pytest_safemerge.targets.diffusers_pipeline:SAFEMERGE_PIPELINE``.
SAFEMERGE_PIPELINE = SafemergePipelineFuse()
