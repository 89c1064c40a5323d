"""Generated layers, adapters and a tiny model, for demonstrations and tests.

Everything here comes from a seed: nothing is downloaded. The tiny model is Llama-shaped
(embeddings, a conv stem, attention and MLP projections) so that every layer kind the
engine fuses appears in it.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from safemerge import names
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.view import view_layer

LAYER_KINDS = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "fan_in_fan_out")
QUANTIZED_KINDS = names.QUANT_TYPES

_TINY_PROJECTIONS = {
    "q_proj": (64, 64),
    "k_proj": (64, 16),
    "v_proj": (64, 16),
    "o_proj": (64, 64),
    "gate_proj": (64, 172),
    "up_proj": (64, 172),
    "down_proj": (172, 64),
}


class TransposedLinear(nn.Module):
    """A linear layer that stores its weight ``(in, out)``, as GPT-2's ``Conv1D`` does."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


def random_layer(
    kind: str = "linear",
    in_features: int = 32,
    out_features: int = 16,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    kernel_size: int = 3,
    std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """A layer of ``kind`` (see :data:`LAYER_KINDS`) with seeded normal weights.

    For ``"embedding"``, ``in_features`` is the number of embeddings and ``out_features``
    the embedding size (as in :class:`LoraAdapter`).
    """
    layer: nn.Module
    if kind == "linear":
        layer = nn.Linear(in_features, out_features, bias=bias)
    elif kind == "embedding":
        layer = nn.Embedding(in_features, out_features)
    elif kind in ("conv1d", "conv2d", "conv3d"):
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
        layer = conv(in_features, out_features, kernel_size, bias=bias)
    elif kind == "fan_in_fan_out":
        layer = TransposedLinear(in_features, out_features, bias=bias)
    else:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(LAYER_KINDS)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return layer.to(dtype)


def quantized_linear(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    *,
    blocksize: int = 64,
    nested: bool = False,
    threshold: float = 0.0,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (``"nf4"``, ``"fp4"``) or ``Linear8bitLt``
    (``"int8"``) holding ``weight`` (``(out, in)``) quantized on ``device``."""
    bnb: Any = importlib.import_module("bitsandbytes")  # optional: imported when used
    out_features, in_features = (int(size) for size in weight.shape)
    data = weight.detach().to(torch.float32).cpu()
    layer: Any
    if quant_type in names.FOUR_BIT_TYPES:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            quant_type=quant_type,
            compress_statistics=nested,
            compute_dtype=compute_dtype,
        )
        layer.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_type=quant_type,
            compress_statistics=nested,
            blocksize=blocksize,
        )
    elif quant_type == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=threshold,
        )
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"quant_type={quant_type!r}: choose one of {names.listed(QUANTIZED_KINDS)}")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    module: nn.Module = layer.to(device)
    return module


def random_adapter(
    layer: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    std: float = 0.02,
    use_rslora: bool = False,
    dora: bool = False,
    lora_bias: bool = False,
    seed: int = 0,
) -> LoraAdapter:
    """A random, well-behaved LoRA adapter that fits ``layer`` (any kind :func:`fuse` takes,
    bitsandbytes layers included). ``lora_A`` is scaled by ``1/sqrt(in)`` as at
    initialisation, ``lora_B`` has standard deviation ``std``."""
    in_features, out_features, kernel, transposed = _adapter_form(layer)
    generator = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(rank, in_features, *kernel, generator=generator) / in_features**0.5
    lora_B = torch.randn(out_features, rank, *(1 for _ in kernel), generator=generator) * std
    bias = torch.randn(out_features, generator=generator) * std if lora_bias else None
    magnitude = None
    if dora:
        magnitude = torch.rand(out_features, generator=generator) + 0.5
    return LoraAdapter(
        lora_A,
        lora_B,
        alpha=alpha,
        use_rslora=use_rslora,
        lora_bias=bias,
        magnitude=magnitude,
        fan_in_fan_out=transposed,
    )


def _adapter_form(layer: nn.Module) -> tuple[int, int, tuple[int, ...], bool]:
    in_features = getattr(layer, "in_features", None)
    out_features = getattr(layer, "out_features", None)
    if type(layer).__name__ in ("Linear4bit", "Linear8bitLt") and in_features and out_features:
        return int(in_features), int(out_features), (), False
    view = view_layer(layer)
    transposed = view.kind == "fan_in_fan_out"
    return view.in_features, view.out_features, view.kernel_size, transposed


def tiny_model(dtype: torch.dtype = torch.bfloat16, *, seed: int = 0) -> dict[str, nn.Module]:
    """A two-block, Llama-shaped toy: attention and MLP projections, embeddings, a conv stem."""
    layers: dict[str, nn.Module] = {
        "embed_tokens": random_layer("embedding", 512, 64, dtype=dtype, seed=seed),
        "stem.conv": random_layer("conv2d", 3, 64, dtype=dtype, seed=seed + 1),
    }
    for block in range(2):
        for index, (name, (in_features, out_features)) in enumerate(_TINY_PROJECTIONS.items()):
            layers[f"layers.{block}.{name}"] = random_layer(
                "linear",
                in_features,
                out_features,
                dtype=dtype,
                bias=False,
                seed=seed + 2 + 10 * block + index,
            )
    return layers


def tiny_state_dict(
    dtype: torch.dtype = torch.bfloat16, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The tiny model's weights by name (``layers.0.q_proj.weight``, ...), plus a norm."""
    tensors = {
        f"{name}.{key}": value.detach().clone()
        for name, layer in tiny_model(dtype, seed=seed).items()
        for key, value in layer.state_dict().items()
    }
    tensors["norm.weight"] = torch.ones(64, dtype=dtype)
    return tensors


def tiny_adapters(*, rank: int = 8, seed: int = 0) -> dict[str, LoraAdapter]:
    """A LoRA adapter for every projection of the tiny model, keyed by weight name."""
    model = tiny_model(torch.float32, seed=seed)
    return {
        f"{name}.weight": random_adapter(layer, rank=rank, alpha=2 * rank, seed=seed + index)
        for index, (name, layer) in enumerate(model.items())
        if name.startswith("layers.")
    }
