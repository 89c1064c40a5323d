"""Tiny models for the PEFT model contract: one module of a LoRA layer kind beside a Linear.

Every model has two targeted modules, registered in this order: ``first``, an
``nn.Linear``, and ``layer``, the kind under test. PEFT walks modules in registration
order, so a model-level entry point reaches ``first`` before ``layer``: a refusal at
``layer`` shows whether ``first`` was already written (model-level atomicity).

The model's forward applies each module to its own input and returns both outputs: the
contract compares outputs module by module, with a bound propagated through that module's
own arithmetic. ``nn.MultiheadAttention``'s output goes through a softmax, where no
such bound is kept: its model returns only ``first``'s output (its weights are still
checked against the oracle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["KINDS", "LayerKind", "TinyModel", "inputs_for"]

_IN, _OUT = 6, 5
_CHANNELS_IN, _CHANNELS_OUT = 3, 4
_EMBEDDINGS = 7
_HEADS_DIM = 4


@dataclass(frozen=True)
class LayerKind:
    """A kind of module PEFT puts a LoRA layer on.

    Attributes:
        name: the cell's name (``conv3d_1x1xk``).
        build: a fresh module of the kind (float32, seeded by the caller).
        fan_in_fan_out: the weight is stored ``(in, out)`` (GPT-2's ``Conv1D``).
        forward_checked: the model's forward returns this module's output.
    """

    name: str
    build: Callable[[], nn.Module]
    fan_in_fan_out: bool = False
    forward_checked: bool = True


def _gpt2_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    module: nn.Module = Conv1D(_OUT, _IN)  # type: ignore[no-untyped-call]
    return module


KINDS: dict[str, LayerKind] = {
    kind.name: kind
    for kind in (
        LayerKind("linear", lambda: nn.Linear(_IN, _OUT)),
        LayerKind("embedding", lambda: nn.Embedding(_EMBEDDINGS, _OUT)),
        LayerKind("conv1d", lambda: nn.Conv1d(_CHANNELS_IN, _CHANNELS_OUT, 1)),
        LayerKind("conv1d_k", lambda: nn.Conv1d(_CHANNELS_IN, _CHANNELS_OUT, 3)),
        LayerKind("conv2d", lambda: nn.Conv2d(_CHANNELS_IN, _CHANNELS_OUT, 1)),
        LayerKind("conv2d_1xk", lambda: nn.Conv2d(_CHANNELS_IN, _CHANNELS_OUT, (1, 3))),
        LayerKind("conv3d", lambda: nn.Conv3d(_CHANNELS_IN, _CHANNELS_OUT, 1)),
        LayerKind("conv3d_1x1xk", lambda: nn.Conv3d(_CHANNELS_IN, _CHANNELS_OUT, (1, 1, 3))),
        LayerKind("gpt2_conv1d", _gpt2_conv1d, fan_in_fan_out=True),
        LayerKind(
            "multihead_attention",
            lambda: nn.MultiheadAttention(_HEADS_DIM, 2),
            forward_checked=False,
        ),
    )
}


class TinyModel(nn.Module):
    """``first`` (a Linear) and ``layer`` (the kind under test), each on its own input."""

    def __init__(self, kind: LayerKind) -> None:
        super().__init__()
        self.first = nn.Linear(_IN, _OUT)
        self.layer = kind.build()
        self.kind = kind

    def forward(self, first: torch.Tensor, layer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = [self.first(first)]
        if self.kind.forward_checked:
            outputs.append(self.layer(layer))
        return tuple(outputs)


def inputs_for(
    kind: LayerKind, dtype: torch.dtype, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A batch of inputs for ``TinyModel(kind)`` in ``dtype`` (indices for an embedding)."""

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    spatial = {"conv1d": (5,), "conv2d": (2, 5), "conv3d": (2, 2, 5)}
    name = kind.name
    layer: torch.Tensor
    if name == "embedding":
        layer = torch.randint(0, _EMBEDDINGS, (3, 4), generator=generator)
    elif name.startswith("conv"):
        layer = normal(2, _CHANNELS_IN, *spatial[name.split("_")[0]])
    elif name == "multihead_attention":
        layer = normal(3, 1, _HEADS_DIM)
    else:
        layer = normal(3, _IN)
    return {"first": normal(3, _IN), "layer": layer}
