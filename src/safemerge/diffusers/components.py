"""Which models of a diffusers pipeline a fuse touches, and the pipeline's own bookkeeping.

diffusers' ``fuse_lora`` works per component (``unet`` or ``transformer``, ``text_encoder``,
``text_encoder_2``), each a diffusers ``ModelMixin`` or a transformers text encoder into
which diffusers (PEFT backend) put PEFT LoRA layers. A pipeline lists the components it
loads LoRAs into in ``_lora_loadable_modules``, and remembers the adapters fused in
``_merged_adapters`` (read by ``num_fused_loras`` and ``fused_loras``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from safemerge.errors import UnsupportedLayerError
from safemerge.model.transaction import plan_error
from safemerge.peft.layers import lora_layers


@dataclass(frozen=True)
class Component:
    """One model of a pipeline (or the single model given).

    Attributes:
        name: the pipeline's attribute (``"unet"``), or ``""`` for a single model.
        model: the model.
    """

    name: str
    model: nn.Module

    @property
    def prefix(self) -> str:
        """What layer names start with in messages: ``"unet."``, or nothing."""
        return f"{self.name}." if self.name else ""


#: The module that defines diffusers' ``DiffusionPipeline``.
_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"


def is_pipeline(pipe_or_model: Any) -> bool:
    """Whether ``pipe_or_model`` is a diffusers ``DiffusionPipeline``."""
    # A pipeline exists only once the module defining its base class was imported, so it
    # is looked up rather than imported: importing it (diffusers' pipelines, transformers)
    # took 0.6 s of the first fuse of a bare UNet. Without diffusers it is never there.
    module = sys.modules.get(_PIPELINE_MODULE)
    return module is not None and isinstance(pipe_or_model, module.DiffusionPipeline)


def selected_components(pipe_or_model: Any, components: Sequence[str] | None) -> list[Component]:
    """The components ``components`` names, checked; None: every one holding LoRA layers.

    Raises:
        ModelFuseError: a named component is not one the pipeline loads LoRAs into.
        TypeError: ``components`` given with a single model, or a string instead of a list.
        UnsupportedLayerError: ``pipe_or_model`` is neither a pipeline nor a module.
    """
    if isinstance(components, str):
        raise TypeError(f"components must be a list of names, got the string {components!r}")
    if not is_pipeline(pipe_or_model):
        if not isinstance(pipe_or_model, nn.Module):
            raise UnsupportedLayerError(
                f"safemerge.diffusers fuses a diffusers DiffusionPipeline or one of its models "
                f"(a ModelMixin or a transformers text encoder); got a "
                f"{type(pipe_or_model).__name__}"
            )
        if components is not None:
            raise TypeError(
                f"components={list(components)} selects models of a pipeline; "
                f"{type(pipe_or_model).__name__} is a single model: leave components out"
            )
        return [Component("", pipe_or_model)]
    loadable = _loadable(pipe_or_model)
    if components is None:
        return [c for c in loadable.values() if holds_lora_layers(c.model)]
    unknown = [name for name in components if name not in loadable]
    if unknown:
        pipeline = type(pipe_or_model).__name__
        problems = [
            (name, f"not a component {pipeline} loads LoRAs into; it has {sorted(loadable)}")
            for name in unknown
        ]
        raise plan_error(problems, None, "the pipeline was not changed")
    return [loadable[name] for name in dict.fromkeys(components)]


def loadable_components(pipe: Any) -> list[Component]:
    """Every model of ``pipe`` that LoRAs are loaded into."""
    return list(_loadable(pipe).values())


def holds_lora_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT tuner layers."""
    return next(lora_layers(model), None) is not None


def merged_adapters(components: Sequence[Component]) -> set[str]:
    """The adapters merged into some layer of ``components``, as diffusers collects them."""
    return {
        name
        for component in components
        for _, layer in lora_layers(component.model)
        for name in layer.merged_adapters
    }


def _loadable(pipe: Any) -> dict[str, Component]:
    """The pipeline's LoRA-loadable models that are there (``_lora_loadable_modules``; a
    pipeline without LoRA loaders: every model among its components)."""
    names = getattr(pipe, "_lora_loadable_modules", None)
    if not names:
        names = [n for n, c in pipe.components.items() if isinstance(c, nn.Module)]
    found = {name: getattr(pipe, name, None) for name in names}
    return {
        name: Component(name, model)
        for name, model in found.items()
        if isinstance(model, nn.Module)
    }
