"""Layers under construction (:class:`Built`): the unquantized kinds (Linear, Embedding,
Conv1d/2d/3d, a layer storing its weight ``(in, out)``) in a drawn dtype, and the
quantized ones (int8, and 4-bit layers of the shapes bitsandbytes accepts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import strategies as st
from torch import nn

import safemerge
from pytest_safemerge._strategies.layer_kinds import LAYER_DTYPES, QUANTIZED_TAGS
from pytest_safemerge._strategies.values import seeded_normal
from safemerge import names, synthetic

if TYPE_CHECKING:
    from pytest_safemerge._strategies.layer_case import LayerCase

#: Bias dtypes of a quantized layer (its weight has none of its own: float32 goes in).
_QUANTIZED_BIAS_DTYPES = (torch.float32, torch.float16)
#: bitsandbytes 4-bit blocksizes drawn; ``out * in`` must be a multiple of the blocksize.
_BLOCKSIZES = (64, 32)
_MAX_SIDE = 16


def _fits_blocks(out_features: int, in_features: int, blocksize: int) -> bool:
    return (out_features * in_features) % blocksize == 0


#: (out, in) pairs with sides up to 16 that bitsandbytes' 4-bit quantization accepts. Every
#: row is narrower than a block, so blocks straddle rows (bitsandbytes 0.50's CPU
#: dequantize_4bit misreads those on some CPUs: an implementation that uses it shows that
#: bug here, see benchmarks/peft_findings/bnb_cpu_dequantize_4bit.py).
_FOUR_BIT_SHAPES = {
    blocksize: tuple(
        (out_features, in_features)
        for out_features in range(1, _MAX_SIDE + 1)
        for in_features in range(1, _MAX_SIDE + 1)
        if _fits_blocks(out_features, in_features, blocksize)
    )
    for blocksize in _BLOCKSIZES
}
#: (out, in) pairs whose rows are whole blocks (in a multiple of the blocksize, 1 to 4 of
#: them), as real layers' are: each block lies within one row, and a row holds several.
_ALIGNED_FOUR_BIT_SHAPES = {
    blocksize: tuple(
        (out_features, in_features)
        for in_features in (32, 64, 128)
        if in_features % blocksize == 0
        for out_features in range(1, 5)
    )
    for blocksize in _BLOCKSIZES
}


def rows_are_whole_blocks(case: LayerCase) -> bool:
    """A 4-bit case whose ``in_features`` is a multiple of its blocksize (no block
    straddles two rows); False for every other case."""
    state = getattr(getattr(case.layer, "weight", None), "quant_state", None)
    if case.layer_tag not in names.FOUR_BIT_TYPES or state is None:
        return False
    return int(state.shape[1]) % int(state.blocksize) == 0


@dataclass
class Built:
    """A layer under construction: its float weight (and bias) are still editable, so a
    case can plant values before a quantized layer is quantized."""

    tag: str
    module: nn.Module | None  # the unquantized layer; None until a quantized one is built
    weight: torch.Tensor  # float, the layer's own layout
    bias: torch.Tensor | None
    dtype: torch.dtype  # the weight's dtype (float32 for quantized layers: what goes in)
    in_features: int  # lora_A.shape[1]
    out_features: int  # lora_B.shape[0]
    kernel: tuple[int, ...]
    quant: dict[str, Any]

    @property
    def transposed(self) -> bool:
        return self.tag in ("embedding", "fan_in_fan_out")

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as the matrix M of ``safemerge.matrix_form`` (a view)."""
        return self.weight.view(self.weight.shape[0], -1)

    def adapter(self, parts: dict[str, Any]) -> safemerge.LoraAdapter:
        return safemerge.LoraAdapter(
            parts["lora_A"],
            parts["lora_B"],
            alpha=parts["alpha"],
            use_rslora=parts["use_rslora"],
            lora_bias=parts["lora_bias"],
            magnitude=parts["magnitude"],
            fan_in_fan_out=self.tag == "fan_in_fan_out",
        )

    def finish(self) -> nn.Module:
        if self.module is not None:
            return self.module
        layer: nn.Module = synthetic.quantized_linear(
            self.weight, self.tag, bias=self.bias, **self.quant
        )
        return layer


@st.composite
def layers(
    draw: st.DrawFn,
    tag: str,
    options: frozenset[str],
    kind: str,
    generator: torch.Generator,
    dtype: torch.dtype | None,
) -> Built:
    needs_bias = "lora-bias" in options
    has_bias = tag != "embedding" and (needs_bias or draw(st.booleans()))
    std = draw(st.sampled_from((1.0, 0.02, 30.0) if tag not in QUANTIZED_TAGS else (1.0, 0.02)))
    if tag in QUANTIZED_TAGS:
        return draw(_quantized(tag, has_bias, std, generator))
    if dtype is None:
        dtype = draw(st.sampled_from(LAYER_DTYPES))
    kernel: tuple[int, ...] = ()
    module: nn.Module
    if tag in ("linear", "fan_in_fan_out", "embedding"):
        out_features = draw(st.integers(1, _MAX_SIDE))
        in_features = draw(st.integers(1, _MAX_SIDE))
        if tag == "linear":
            module = nn.Linear(in_features, out_features, bias=has_bias)
        elif tag == "fan_in_fan_out":
            module = synthetic.TransposedLinear(in_features, out_features, bias=has_bias)
        else:
            module = nn.Embedding(in_features, out_features)  # (num_embeddings, dim)
    else:
        dims = int(tag[4])
        out_features = draw(st.integers(1, 8))
        in_features = draw(st.integers(1, 4))
        kernel = tuple(draw(st.integers(1, 3 if dims < 3 else 2)) for _ in range(dims))
        conv: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        module = conv(in_features, out_features, kernel, bias=has_bias)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(seeded_normal(tuple(parameter.shape), std, torch.float32, generator))
    module = module.to(dtype)
    parts: Any = module
    return Built(
        tag,
        module,
        parts.weight.data,
        parts.bias.data if has_bias else None,
        dtype,
        in_features,
        out_features,
        kernel,
        {},
    )


@st.composite
def _quantized(
    draw: st.DrawFn, tag: str, has_bias: bool, std: float, generator: torch.Generator
) -> Built:
    quant: dict[str, Any]
    if tag == "int8":
        out_features = draw(st.integers(1, _MAX_SIDE))
        in_features = draw(st.integers(1, _MAX_SIDE))
        quant = {"threshold": draw(st.sampled_from((0.0, 6.0)))}
    else:
        blocksize = draw(st.sampled_from(_BLOCKSIZES))
        # Rows narrower than a block (blocks straddle rows), or rows of whole blocks.
        shapes = _ALIGNED_FOUR_BIT_SHAPES if draw(st.booleans()) else _FOUR_BIT_SHAPES
        out_features, in_features = draw(st.sampled_from(shapes[blocksize]))
        quant = {"blocksize": blocksize, "nested": draw(st.booleans())}
    weight = seeded_normal((out_features, in_features), std, torch.float32, generator)
    bias = None
    if has_bias:
        bias_dtype = draw(st.sampled_from(_QUANTIZED_BIAS_DTYPES))
        bias = seeded_normal((out_features,), std, bias_dtype, generator)
    return Built(tag, None, weight, bias, torch.float32, in_features, out_features, (), quant)
