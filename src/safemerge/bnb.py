"""bitsandbytes 4-bit layers: read their weight, requantize it, snapshot and restore it.

The only module that imports bitsandbytes, and only when a bitsandbytes layer is fused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from safemerge.quant_grid import CODES

_4BIT_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4")
_8BIT_CLASSES = ("Linear8bitLt",)


def is_bnb_layer(layer: Any) -> bool:
    """A layer class from bitsandbytes (checked without importing it)."""
    return type(layer).__module__.startswith("bitsandbytes")


def is_4bit_layer(layer: Any) -> bool:
    return is_bnb_layer(layer) and type(layer).__name__ in _4BIT_CLASSES


@dataclass(frozen=True)
class Settings4bit:
    """How a 4-bit weight is quantized, as it was first quantized (not as repacked)."""

    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    nested: bool
    dtype: torch.dtype
    storage: torch.dtype
    cpu_packed: bool


@dataclass(frozen=True, eq=False)
class Snapshot4bit:
    """The packed bytes and quantization state of a 4-bit weight, copied whole."""

    data: torch.Tensor
    quant_state: Any

    @property
    def nbytes(self) -> int:
        """Packed bytes plus the absmax (and the nested absmax's own absmax)."""
        tensors = [self.data, self.quant_state.absmax]
        if getattr(self.quant_state, "state2", None) is not None:
            tensors.append(self.quant_state.state2.absmax)
        return sum(t.numel() * t.element_size() for t in tensors)


def settings(layer: Any) -> Settings4bit:
    state = layer.weight.quant_state
    cpu_packed = bool(getattr(state, "packing_format_for_cpu", False))
    nested = bool(state.original_nested) if cpu_packed else bool(state.nested)
    dtype = state.original_dtype if cpu_packed else state.dtype
    storage = getattr(state, "original_storage_type", None) or layer.weight.data.dtype
    rows, columns = (int(size) for size in state.shape)
    return Settings4bit(
        (rows, columns),
        int(state.blocksize),
        str(state.quant_type),
        nested,
        dtype,
        storage,
        cpu_packed,
    )


def snapshot(layer: Any) -> Snapshot4bit:
    return Snapshot4bit(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))


def restore(layer: Any, saved: Snapshot4bit) -> None:
    """Put back exactly the bytes and state of ``saved`` (copies: ``saved`` stays reusable)."""
    commit(layer, saved.data.clone(), copy.deepcopy(saved.quant_state))


def dequantized(layer: Any) -> torch.Tensor:
    """The weight a 4-bit layer holds, as float32 ``(out, in)``: code * absmax, exactly.

    Computed here from the codes and the absmax rather than by bitsandbytes'
    ``dequantize_4bit``, whose CPU path misplaces the absmax of blocks that span rows
    (blocksize > in_features; bitsandbytes 0.50). A weight that bitsandbytes has repacked
    for its AVX512-BF16 CPU kernel (``packing_format_for_cpu``, after one inference pass)
    is read in that layout: its codes are reordered and its absmax is the bfloat16,
    transposed copy the CPU kernel uses, so that is what the layer's weight is.
    """
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _dequantized_cpu_packed(layer)
    return dequantize_plain(layer.weight.data, state)


def _codes(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Code indices of a plain-layout 4-bit tensor: two a byte, high nibble first."""
    data = packed.reshape(-1).view(torch.uint8)
    codes = torch.empty(data.numel() * 2, dtype=torch.long, device=data.device)
    codes[0::2] = (data >> 4).long()
    codes[1::2] = (data & 0xF).long()
    return codes[:count]


def _from_codes(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    shape: tuple[int, int],
    blocksize: int,
) -> torch.Tensor:
    table = torch.tensor(CODES[quant_type], dtype=torch.float32, device=codes.device)
    count = shape[0] * shape[1]
    per_element_absmax = absmax.float().reshape(-1).repeat_interleave(blocksize)[:count]
    return (table[codes] * per_element_absmax).reshape(shape)


def _dequantized_cpu_packed(layer: Any) -> torch.Tensor:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = layer.weight.quant_state
    rows, columns = (int(size) for size in state.shape)
    # The inverse reorders the codes exactly (its absmax handling is lossy; not used here).
    reordered, _ = _convert_weight_packed_for_cpu_inverse(
        layer.weight.data.clone(), copy.deepcopy(state)
    )
    codes = _codes(reordered, rows * columns)
    # Blocks never span rows in this layout: absmax is (in / blocksize, out), transposed.
    absmax = state.absmax.T.reshape(-1)
    return _from_codes(codes, absmax, str(state.quant_type), (rows, columns), int(state.blocksize))


def quantize(values: torch.Tensor, like: Settings4bit) -> tuple[torch.Tensor, Any]:
    """Quantize float32 ``values`` with the same settings, in bitsandbytes' plain layout."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        values.contiguous(),
        blocksize=like.blocksize,
        compress_statistics=like.nested,
        quant_type=like.quant_type,
        quant_storage=like.storage,
    )
    state.dtype = like.dtype  # what dequantize returns, as before
    return packed, state


def stored_absmax(state: Any) -> torch.Tensor:
    """The per-block absmax as dequantization uses it (nested ones dequantized), float32."""
    import bitsandbytes.functional as bnb_functional

    absmax: torch.Tensor = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def dequantize_plain(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """float32 ``code * absmax`` of a plain-layout 4-bit weight (blocks in flat order)."""
    rows, columns = (int(size) for size in state.shape)
    codes = _codes(packed, rows * columns)
    return _from_codes(
        codes, stored_absmax(state), str(state.quant_type), (rows, columns), int(state.blocksize)
    )


def commit(layer: Any, packed: torch.Tensor, state: Any) -> None:
    """Make ``packed`` and ``state`` the layer's weight (plain attribute assignments)."""
    weight = layer.weight
    weight.data = packed
    weight.quant_state = state
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = state
