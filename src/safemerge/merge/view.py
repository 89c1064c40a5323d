"""How each layer kind stores its weight, and where an adapter's delta lands in it.

Every supported layer is seen as one matrix ``M`` (a view or reshape of its weight) and
every adapter's delta as a product ``left @ right`` in ``M``'s layout:

==================  ==========================  ==============  ==============
layer               M                           left            right
==================  ==========================  ==============  ==============
Linear              weight ``(out, in)``         B ``(out, r)``   A ``(r, in)``
fan_in_fan_out      weight ``(in, out)``         A.T             B.T
Embedding           weight ``(num, dim)``        A.T             B.T
ConvNd              weight as ``(out, in*k)``    B as (out, r)   A as (r, in*k)
==================  ==========================  ==============  ==============

Output channels are M's rows (Linear, ConvNd) or columns (fan_in_fan_out, Embedding);
DoRA normalises along them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safemerge.errors import AdapterConfigError, UnsupportedLayerError
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.numerics import SUPPORTED_DTYPES

_QUANTIZED_CLASS_NAMES = ("Linear4bit", "Linear8bitLt", "Params4bit", "Int8Params")


@dataclass(frozen=True)
class LayerView:
    """A layer seen as one matrix, with the facts the fuse engine needs."""

    name: str
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    matrix_shape: tuple[int, int]
    transposed: bool
    kernel_size: tuple[int, ...] = ()

    @property
    def matrix(self) -> torch.Tensor:
        """The weight's data as ``M`` (a view when the weight is contiguous)."""
        return self.weight.detach().reshape(self.matrix_shape)

    @property
    def out_features(self) -> int:
        return self.matrix_shape[1] if self.transposed else self.matrix_shape[0]

    @property
    def in_features(self) -> int:
        """Input size as the adapter sees it (input channels for a convolution)."""
        columns = self.matrix_shape[0] if self.transposed else self.matrix_shape[1]
        kernel_elements = 1
        for size in self.kernel_size:
            kernel_elements *= size
        return columns // kernel_elements

    def factors(self, adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` with ``left @ right`` the adapter's unscaled delta in M's layout."""
        self.check_fits(adapter)
        up, down = adapter.up_matrix(), adapter.down_matrix()
        if self.transposed:
            return down.T, up.T
        return up, down

    def check_fits(self, adapter: LoraAdapter) -> None:
        """Raise AdapterConfigError unless the adapter's shapes and options fit this layer."""
        if adapter.fan_in_fan_out != (self.kind == "fan_in_fan_out"):
            raise AdapterConfigError(_fan_in_fan_out_advice(self, adapter))
        expected = (self.out_features, self.in_features, self.kernel_size)
        got = (adapter.out_features, adapter.in_features, adapter.kernel_size)
        if expected != got:
            raise AdapterConfigError(
                f"adapter does not fit layer {self.name!r} ({self.kind}, weight shape "
                f"{tuple(self.weight.shape)}): the layer needs out_features={expected[0]}, "
                f"in_features={expected[1]}, kernel={expected[2]}, but the adapter has "
                f"out_features={got[0]} (lora_B.shape={tuple(adapter.lora_B.shape)}), "
                f"in_features={got[1]}, kernel={got[2]} (lora_A.shape={tuple(adapter.lora_A.shape)})"
            )
        if adapter.lora_bias is not None and self.bias is None:
            raise AdapterConfigError(
                f"the adapter has a lora_bias but layer {self.name!r} has no bias to add it to"
            )


def view_layer(layer: nn.Module, name: str | None = None) -> LayerView:
    """Describe ``layer`` as a :class:`LayerView`, or refuse it with a clear error."""
    label = name or type(layer).__name__
    class_name = type(layer).__name__
    if class_name in _QUANTIZED_CLASS_NAMES:
        raise UnsupportedLayerError(
            f"layer {label!r} is a {class_name} from {type(layer).__module__}, not bitsandbytes': "
            f"safemerge fuses bitsandbytes' own quantized layers only"
        )
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedLayerError(f"layer {label!r} ({class_name}) has no weight tensor")
    if weight.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise UnsupportedLayerError(
            f"layer {label!r} has a weight of dtype {weight.dtype}; safemerge fuses into {names}"
        )
    bias = getattr(layer, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if isinstance(layer, nn.Linear):
        return LayerView(label, "linear", weight, bias, (weight.shape[0], weight.shape[1]), False)
    if isinstance(layer, nn.Embedding):
        return LayerView(label, "embedding", weight, None, (weight.shape[0], weight.shape[1]), True)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1:
            raise UnsupportedLayerError(
                f"layer {label!r} is a grouped convolution (groups={layer.groups}): its LoRA "
                f"delta is block-diagonal and is not supported; only groups=1 convolutions fuse"
            )
        kernel = tuple(int(size) for size in weight.shape[2:])
        columns = weight.numel() // weight.shape[0]
        kind = f"conv{weight.ndim - 2}d"
        return LayerView(label, kind, weight, bias, (weight.shape[0], columns), False, kernel)
    if weight.ndim == 2:
        # GPT-2's transformers Conv1D and similar: a matmul layer storing (in, out).
        return LayerView(
            label, "fan_in_fan_out", weight, bias, (weight.shape[0], weight.shape[1]), True
        )
    raise UnsupportedLayerError(
        f"layer {label!r} ({class_name}, weight shape {tuple(weight.shape)}) is not a kind "
        f"safemerge fuses: Linear, Embedding, Conv1d/2d/3d, or a 2-D weight stored as "
        f"(in, out) with fan_in_fan_out=True"
    )


def _fan_in_fan_out_advice(view: LayerView, adapter: LoraAdapter) -> str:
    if adapter.fan_in_fan_out:
        return (
            f"the adapter has fan_in_fan_out=True but layer {view.name!r} is a {view.kind} "
            f"layer that does not store its weight as (in, out); create the adapter with "
            f"fan_in_fan_out=False"
        )
    return (
        f"layer {view.name!r} stores its weight as (in, out) (GPT-2 Conv1D style, weight "
        f"shape {tuple(view.weight.shape)}); create the adapter with fan_in_fan_out=True"
    )


def matrix_form(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's weight and adapter as ``(M, A, B)`` with the merge ``M + scale * B @ A``.

    ``M`` is a view of ``weight`` as a matrix (a convolution's kernel folded into its
    columns); an embedding's or a ``fan_in_fan_out`` layer's delta is stored transposed,
    so there ``A = lora_B^T`` and ``B = lora_A^T``. ``kind`` is the layer kind
    (``AdapterSet.kinds``: "linear", "embedding", "fan_in_fan_out", "conv2d", ...).
    """
    matrix = weight.reshape(weight.shape[0], -1)
    rank = int(lora_A.shape[0])
    down = lora_A.reshape(rank, -1)
    up = lora_B.reshape(lora_B.shape[0], rank)
    if kind in ("embedding", "fan_in_fan_out"):
        return matrix, up.T, down.T
    return matrix, down, up
