"""bitsandbytes layers: read their weight, requantize it, snapshot and restore it.

The only module that imports bitsandbytes, and only when a bitsandbytes layer is fused.
Each supported layer kind is a :class:`QuantizedFormat`: how to read the weight it holds
as float32, how to quantize a float32 merge with the layer's own settings (and the bound
that quantization keeps), how to install the result, and how to save and put back every
byte of the original.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from safemerge.merge import guard
from safemerge.merge.numerics import U32
from safemerge.quant import quantize4
from safemerge.quant.grid import CODES, block_bounds, blocks_of
from safemerge.quant.quantize4 import stored_absmax as _stored_absmax

_4BIT_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4")
_8BIT_CLASSES = ("Linear8bitLt",)


def is_bnb_layer(layer: Any) -> bool:
    """A layer class from bitsandbytes (checked without importing it)."""
    return type(layer).__module__.startswith("bitsandbytes")


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Copies of every tensor and state object that make up a quantized weight."""

    attributes: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(value) for value in self.attributes.values())


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized weight ready to install: its tensors, its float32 value, its bound.

    The bound on ``|values - merged|`` is one number per group of ``group`` elements in
    flat order (a 4-bit block, an 8-bit row), plus an element's own term where there is
    one (the float16 rounding of the 8-bit path).
    """

    attributes: dict[str, Any]
    values: torch.Tensor
    group: int
    group_bound: torch.Tensor = field(repr=False)
    element_bound: torch.Tensor | None = field(default=None, repr=False)

    @property
    def bound(self) -> torch.Tensor:
        """The bound of every element, float64, shaped like ``values``."""
        expanded = self.group_bound.repeat_interleave(self.group)[: self.values.numel()]
        bound = expanded.reshape(self.values.shape)
        return bound if self.element_bound is None else bound + self.element_bound

    def worst_ratio(self, merged: torch.Tensor, start: int = 0) -> float:
        """The largest ``|values - merged| / bound`` over the elements ``merged`` holds:
        all of them, or (a report taken in slices) those from flat position ``start``, a
        multiple of ``group``, on."""
        count = merged.numel()
        if count == 0:
            return 0.0
        error = (self.values.reshape(-1)[start : start + count] - merged.reshape(-1)).abs_()
        first = start // self.group
        group_bound = self.group_bound[first : first + -(-count // self.group)]
        if self.element_bound is not None:
            bound = group_bound.float().repeat_interleave(self.group)[:count]
            bound += self.element_bound.reshape(-1)[start : start + count]
            return float((error / bound.clamp_min(torch.finfo(torch.float32).tiny)).max())
        worst_in_group = blocks_of(error, self.group).amax(dim=1).double()
        return float(
            (worst_in_group / group_bound.clamp_min(torch.finfo(torch.float64).tiny)).max()
        )


class QuantizedFormat:
    """One bitsandbytes layer kind; subclasses fill in the format."""

    kind = ""
    group = 1  # elements that share a scale, in flat order: what "a block" means
    #: The dtype a float32 merge must fit before it is quantized.
    merge_dtype = torch.float32

    def __init__(self, layer: Any, name: str) -> None:
        self.layer = layer
        self.name = name

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def data(self) -> torch.Tensor:
        """The quantized weight's own bytes (packed codes, or int8 rows), in a layout that
        inference does not change."""
        data: torch.Tensor = self.layer.weight.data
        return data

    def read(self) -> torch.Tensor:
        """The weight the layer holds, float32 ``(out, in)``."""
        raise NotImplementedError

    def quantize(self, merged: torch.Tensor) -> Quantized:
        """Quantize a float32 merge with the layer's settings (guarded where it casts)."""
        raise NotImplementedError

    def magnitude_limit(self) -> float:
        """An upper bound on every weight the layer holds, read from its scales alone."""
        raise NotImplementedError

    def snapshot(self) -> Snapshot:
        raise NotImplementedError

    def install(self, attributes: dict[str, Any]) -> None:
        raise NotImplementedError

    def restore(self, saved: Snapshot) -> None:
        """Put back exactly what ``saved`` holds (copies, so ``saved`` stays reusable)."""
        self.install(copy.deepcopy(saved.attributes))


class FourBit(QuantizedFormat):
    """``Linear4bit``: NF4/FP4 codes, per-block absmax (optionally itself quantized)."""

    kind = "linear4bit"

    def __init__(self, layer: Any, name: str) -> None:
        super().__init__(layer, name)
        state = layer.weight.quant_state
        self.blocksize = int(state.blocksize)
        self.quant_type = str(state.quant_type)
        self.nested = bool(state.original_nested if self.cpu_packed else state.nested)
        self.dtype = state.original_dtype if self.cpu_packed else state.dtype  # as quantized
        self.storage = getattr(state, "original_storage_type", None) or layer.weight.data.dtype
        self.group = self.blocksize

    @property
    def cpu_packed(self) -> bool:
        """Whether the weight is now in the AVX512-BF16 CPU kernel's layout."""
        return bool(getattr(self.layer.weight.quant_state, "packing_format_for_cpu", False))

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = (int(size) for size in self.layer.weight.quant_state.shape)
        return rows, columns

    def describe(self) -> dict[str, Any]:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "nested": self.nested}

    def data(self) -> torch.Tensor:
        """The packed codes in bitsandbytes' plain layout (a CPU-repacked weight reordered
        back), so that inference's repacking does not look like a change."""
        if not self.cpu_packed:
            return super().data()
        return self._plain_codes()

    def _plain_codes(self) -> torch.Tensor:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # The inverse reorders the codes exactly (its absmax handling is lossy: unused).
        state = self.layer.weight.quant_state
        reordered, _ = _convert_weight_packed_for_cpu_inverse(
            self.layer.weight.data.clone(), copy.deepcopy(state)
        )
        codes: torch.Tensor = reordered.reshape(-1).view(torch.uint8)
        return codes

    def read(self) -> torch.Tensor:
        """``code * absmax`` exactly, computed here rather than by bitsandbytes'
        ``dequantize_4bit``, whose CPU path misplaces the absmax of blocks that span rows
        (blocksize > in_features; bitsandbytes 0.50). A weight repacked for the
        AVX512-BF16 CPU kernel (``packing_format_for_cpu``, after one inference pass) is
        read in that layout: reordered codes and the bfloat16, transposed absmax the CPU
        kernel computes with, so that is what the layer's weight is."""
        state = self.layer.weight.quant_state
        if self.cpu_packed:
            absmax = state.absmax.T.reshape(-1)  # (in / blocksize, out) in this layout
            return self._from_codes(self._plain_codes(), absmax)
        return self._from_codes(self.layer.weight.data, _stored_absmax(state))

    def quantize(self, merged: torch.Tensor) -> Quantized:
        merged = merged.contiguous()
        # bitsandbytes' quantize_4bit, bit for bit; vectorised on the CPU (quantize4).
        done = quantize4.quantize_4bit(
            merged, self.blocksize, self.nested, self.quant_type, self.storage
        )
        if done is None:
            packed, state = _bnb_quantize_4bit(
                merged, self.blocksize, self.nested, self.quant_type, self.storage
            )
            absmax = _stored_absmax(state)
            values = self._from_codes(packed, absmax)
            bounds = block_bounds(merged, self.blocksize, self.quant_type, absmax)
        else:
            packed, state, values = done.packed, done.state, done.values
            absmax = _stored_absmax(state)
            bounds = block_bounds(merged, self.blocksize, self.quant_type, absmax, done.true_absmax)
        state.dtype = self.dtype  # what dequantization returns, as before
        return Quantized({"data": packed, "quant_state": state}, values, self.blocksize, bounds)

    def magnitude_limit(self) -> float:
        if self.cpu_packed:
            return math.inf  # the repacked layout's scales are not read here
        # Codes lie in [-1, 1]; the float32 product with the absmax rounds once.
        return float(_stored_absmax(self.layer.weight.quant_state).abs().max()) * (1 + U32)

    def snapshot(self) -> Snapshot:
        weight = self.layer.weight
        return Snapshot(
            {"data": weight.data.clone(), "quant_state": copy.deepcopy(weight.quant_state)}
        )

    def install(self, attributes: dict[str, Any]) -> None:
        weight = self.layer.weight
        weight.data = attributes["data"]
        weight.quant_state = attributes["quant_state"]
        if getattr(self.layer, "quant_state", None) is not None:
            self.layer.quant_state = attributes["quant_state"]

    def _from_codes(self, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        rows, columns = self.shape
        data = packed.reshape(-1).view(torch.uint8)
        # Two codes a byte, high nibble first: one gather from a table of byte -> pair
        # (index_select: several times faster than advanced indexing here).
        pairs = _byte_pairs(self.quant_type, data.device).index_select(0, data.int()).reshape(-1)
        values = blocks_of(pairs[: rows * columns], self.blocksize)
        values *= absmax.float().reshape(-1, 1)
        return values.reshape(-1)[: rows * columns].reshape(rows, columns)


class EightBit(QuantizedFormat):
    """``Linear8bitLt`` (LLM.int8()): int8 rows ``CB`` with row scales ``SCB``.

    ``SCB`` lives on the weight until the first forward pass moves it (and ``CB``) into
    the layer's ``state``; both places are read and written. Quantization goes through
    float16, so a merge that overflows float16 is refused, like any non-finite one.
    """

    kind = "linear8bitlt"
    merge_dtype = torch.float16

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = (int(size) for size in self.layer.weight.data.shape)
        return rows, columns

    @property
    def group(self) -> int:  # type: ignore[override]
        return self.shape[1]

    def describe(self) -> dict[str, Any]:
        return {"threshold": float(self.layer.state.threshold)}

    def _scales(self) -> torch.Tensor:
        weight, state = self.layer.weight, self.layer.state
        scales: torch.Tensor | None = (
            weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
        )
        if scales is None:
            raise _not_quantized_yet(self.name)
        return scales

    def read(self) -> torch.Tensor:
        codes: torch.Tensor = self.layer.weight.data
        return codes.float() * (self._scales().float()[:, None] / 127.0)

    def quantize(self, merged: torch.Tensor) -> Quantized:
        import bitsandbytes.functional as bnb_functional

        guard.check_vector(merged, layer=self.name, tensor="weight", dtype=torch.float16)
        half = merged.to(torch.float16)
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(half)  # threshold 0: A untouched
        values = codes.float() * (scales.float()[:, None] / 127.0)
        # Row-wise rounding to 1/127 of the row's absmax, the float16 cast before it, and
        # the float32 products of (de)quantization. The float16 error is exact in float32
        # up to one rounding of the difference, which the factor covers.
        row_bound = scales.double() * (1 / 254 + 4 * U32)
        float16_error = (half.float() - merged).abs_().mul_(1 + 4 * U32)
        return Quantized(
            {"CB": codes, "SCB": scales}, values, self.shape[1], row_bound, float16_error
        )

    def magnitude_limit(self) -> float:
        # Codes lie in [-127, 127] and dequantize to code * SCB / 127, rounded twice.
        return float(self._scales().float().abs().max()) * (1 + 2 * U32)

    def snapshot(self) -> Snapshot:
        weight, state = self.layer.weight, self.layer.state
        return Snapshot(
            {
                "data": weight.data.clone(),
                "weight.CB": _clone(getattr(weight, "CB", None)),
                "weight.SCB": _clone(getattr(weight, "SCB", None)),
                "state.CB": _clone(state.CB),
                "state.SCB": _clone(state.SCB),
            }
        )

    def install(self, attributes: dict[str, Any]) -> None:
        weight, state = self.layer.weight, self.layer.state
        if "CB" in attributes:  # a new quantization: put it wherever the scales live now
            codes, scales = attributes["CB"], attributes["SCB"]
            on_weight = getattr(weight, "SCB", None) is not None
            weight.data = codes
            weight.CB, weight.SCB = (codes, scales) if on_weight else (None, None)
            if state.SCB is not None or not on_weight:
                state.CB, state.SCB = codes, scales
            return
        weight.data = attributes["data"]
        weight.CB, weight.SCB = attributes["weight.CB"], attributes["weight.SCB"]
        state.CB, state.SCB = attributes["state.CB"], attributes["state.SCB"]


@functools.cache
def _byte_pairs(quant_type: str, device: torch.device) -> torch.Tensor:
    """``(256, 2)`` float32: the two code values each packed byte holds."""
    table = torch.tensor(CODES[quant_type], dtype=torch.float32)
    every_byte = torch.arange(256)
    return torch.stack([table[every_byte >> 4], table[every_byte & 0xF]], dim=1).to(device)


def format_of(layer: Any, name: str) -> QuantizedFormat | None:
    """The format of a supported bitsandbytes layer; None for any other layer."""
    if not is_bnb_layer(layer):
        return None
    if type(layer).__name__ in _4BIT_CLASSES:
        return FourBit(layer, name)
    if type(layer).__name__ in _8BIT_CLASSES:
        return EightBit(layer, name)
    return None


def _not_quantized_yet(name: str) -> Exception:
    from safemerge.errors import UnsupportedLayerError

    return UnsupportedLayerError(
        f"layer {name!r} is an 8-bit layer whose weight is not quantized yet (no SCB): move it "
        f"to its device first (layer.to('cpu') or .cuda()), which quantizes it"
    )


def _bnb_quantize_4bit(
    merged: torch.Tensor, blocksize: int, nested: bool, quant_type: str, storage: torch.dtype
) -> tuple[torch.Tensor, Any]:
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        merged,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )
    return packed, state


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    absmax = getattr(value, "absmax", None)  # a QuantState
    nested = getattr(value, "state2", None)
    return _nbytes(absmax) + (_nbytes(nested) if nested is not None else 0)
