"""The :class:`LayerCase` dataclass (one call ``fuse_layer(layer, adapters, scale)``) and how
it describes itself."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

import safemerge
from pytest_safemerge._strategies.layer_kinds import (
    OPTION_TAGS,
    QUANTIZED_TAGS,
    REFUSED_LAYER_KINDS,
)


@dataclass(frozen=True, eq=False)
class LayerCase:
    """One call ``fuse_layer(layer, adapters, scale)``.

    Attributes:
        layer: the pristine layer, on the CPU. Never hand it to the code under test:
            :meth:`fresh_layer` gives a copy.
        adapters: the adapters, pristine (:meth:`fresh_adapters` gives copies).
        scale: the overall scale (PEFT's ``lora_scale``).
        kind: ``"random"`` or one of :data:`REFUSED_LAYER_KINDS`.
        tags: the layer kind's tag and the options the case uses.
        layer_tag: the layer kind's tag alone.
        detail: what was planted where (empty for random cases).
    """

    layer: nn.Module
    adapters: tuple[safemerge.LoraAdapter, ...]
    scale: float
    kind: str
    tags: frozenset[str]
    layer_tag: str
    detail: str = ""

    @property
    def must_refuse(self) -> bool:
        return self.kind in REFUSED_LAYER_KINDS

    @property
    def quantized(self) -> bool:
        return self.layer_tag in QUANTIZED_TAGS

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(tag for tag in OPTION_TAGS if tag in self.tags)

    def fresh_layer(self, device: str | torch.device = "cpu") -> nn.Module:
        """A copy of the layer, quantization state included, on ``device`` (bitsandbytes
        moves a quantized weight's bytes and state as they are)."""
        return copy.deepcopy(self.layer).to(device)

    def fresh_adapters(self, device: str | torch.device = "cpu") -> list[safemerge.LoraAdapter]:
        """Copies of the adapters, on ``device`` (strides kept)."""
        return [_adapter_copy(adapter, device) for adapter in self.adapters]

    def describe(self) -> str:
        layer = _describe_layer(self.layer, self.layer_tag)
        adapters = ", ".join(_describe_adapter(adapter) for adapter in self.adapters)
        return f"{layer}; adapters [{adapters}]; scale {self.scale!r}"


def _adapter_copy(adapter: safemerge.LoraAdapter, device: str | torch.device) -> Any:
    def moved(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, copy=True)

    return replace(
        adapter,
        lora_A=adapter.lora_A.to(device, copy=True),
        lora_B=adapter.lora_B.to(device, copy=True),
        lora_bias=moved(adapter.lora_bias),
        magnitude=moved(adapter.magnitude),
    )


def _describe_layer(layer: Any, tag: str) -> str:
    weight = layer.weight
    bias = getattr(layer, "bias", None)
    has_bias = f"bias {str(bias.dtype).removeprefix('torch.')}" if bias is not None else "no bias"
    if tag == "int8":
        return f"int8 Linear8bitLt {tuple(weight.shape)} (threshold {layer.state.threshold}, {has_bias})"
    if tag in ("nf4", "fp4"):
        state = weight.quant_state
        return (
            f"{tag} Linear4bit {tuple(state.shape)} (blocksize {state.blocksize}, "
            f"nested {state.nested}, {has_bias})"
        )
    dtype = str(weight.dtype).removeprefix("torch.")
    return f"{tag} {type(layer).__name__} weight {tuple(weight.shape)} {dtype} ({has_bias})"


def _describe_adapter(adapter: safemerge.LoraAdapter) -> str:
    parts = [f"rank {adapter.rank}", f"alpha {adapter.alpha}"]
    if adapter.use_rslora:
        parts.append("rslora")
    parts.append(f"scale {adapter.scale:.6g}")
    if adapter.lora_A.dtype != torch.float32:
        parts.append(str(adapter.lora_A.dtype).removeprefix("torch."))
    if adapter.lora_bias is not None:
        parts.append("lora_bias")
    if adapter.magnitude is not None:
        parts.append("dora")
    return " ".join(parts)
