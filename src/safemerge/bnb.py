"""bitsandbytes layers: read their weight, requantize it, snapshot and restore it.

The only module that imports bitsandbytes, and only when a bitsandbytes layer is fused.
Each supported layer kind is a :class:`QuantizedFormat`: how to read the weight it holds
as float32, how to quantize a float32 merge with the layer's own settings (and the bound
that quantization keeps), how to install the result, and how to save and put back every
byte of the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from safemerge import guard
from safemerge.numerics import U32
from safemerge.quant_grid import CODES, blockwise_bound

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
    """A quantized weight ready to install: its tensors and its float32 value."""

    attributes: dict[str, Any]
    values: torch.Tensor
    bound: torch.Tensor = field(repr=False)


class QuantizedFormat:
    """One bitsandbytes layer kind; subclasses fill in the format."""

    kind = ""
    group = 1  # elements that share a scale, in flat order: what "a block" means

    def __init__(self, layer: Any, name: str) -> None:
        self.layer = layer
        self.name = name

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def read(self) -> torch.Tensor:
        """The weight the layer holds, float32 ``(out, in)``."""
        raise NotImplementedError

    def quantize(self, merged: torch.Tensor) -> Quantized:
        """Quantize a float32 merge with the layer's settings (guarded where it casts)."""
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
        self.cpu_packed = bool(getattr(state, "packing_format_for_cpu", False))
        self.blocksize = int(state.blocksize)
        self.quant_type = str(state.quant_type)
        self.nested = bool(state.original_nested if self.cpu_packed else state.nested)
        self.dtype = state.original_dtype if self.cpu_packed else state.dtype
        self.storage = getattr(state, "original_storage_type", None) or layer.weight.data.dtype
        self.group = self.blocksize

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = (int(size) for size in self.layer.weight.quant_state.shape)
        return rows, columns

    def describe(self) -> dict[str, Any]:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "nested": self.nested}

    def read(self) -> torch.Tensor:
        """``code * absmax`` exactly, computed here rather than by bitsandbytes'
        ``dequantize_4bit``, whose CPU path misplaces the absmax of blocks that span rows
        (blocksize > in_features; bitsandbytes 0.50). A weight repacked for the
        AVX512-BF16 CPU kernel (``packing_format_for_cpu``, after one inference pass) is
        read in that layout: reordered codes and the bfloat16, transposed absmax the CPU
        kernel computes with, so that is what the layer's weight is."""
        state = self.layer.weight.quant_state
        if self.cpu_packed:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            # The inverse reorders the codes exactly (its absmax handling is lossy: unused).
            reordered, _ = _convert_weight_packed_for_cpu_inverse(
                self.layer.weight.data.clone(), copy.deepcopy(state)
            )
            absmax = state.absmax.T.reshape(-1)  # (in / blocksize, out) in this layout
            return self._from_codes(reordered, absmax)
        return self._from_codes(self.layer.weight.data, _stored_absmax(state))

    def quantize(self, merged: torch.Tensor) -> Quantized:
        import bitsandbytes.functional as bnb_functional

        packed, state = bnb_functional.quantize_4bit(
            merged.contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.nested,
            quant_type=self.quant_type,
            quant_storage=self.storage,
        )
        state.dtype = self.dtype  # what dequantization returns, as before
        absmax = _stored_absmax(state)
        bound = blockwise_bound(merged, self.blocksize, self.quant_type, absmax).reshape(
            merged.shape
        )
        return Quantized(
            {"data": packed, "quant_state": state}, self._from_codes(packed, absmax), bound
        )

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
        codes = torch.empty(data.numel() * 2, dtype=torch.long, device=data.device)
        codes[0::2] = (data >> 4).long()  # two codes a byte, high nibble first
        codes[1::2] = (data & 0xF).long()
        table = torch.tensor(CODES[self.quant_type], dtype=torch.float32, device=data.device)
        scales = absmax.float().reshape(-1).repeat_interleave(self.blocksize)[: rows * columns]
        return (table[codes[: rows * columns]] * scales).reshape(rows, columns)


class EightBit(QuantizedFormat):
    """``Linear8bitLt`` (LLM.int8()): int8 rows ``CB`` with row scales ``SCB``.

    ``SCB`` lives on the weight until the first forward pass moves it (and ``CB``) into
    the layer's ``state``; both places are read and written. Quantization goes through
    float16, so a merge that overflows float16 is refused, like any non-finite one.
    """

    kind = "linear8bitlt"

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
        scales: torch.Tensor | None = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
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
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(half.clone())
        values = codes.float() * (scales.float()[:, None] / 127.0)
        # Row-wise rounding to 1/127 of the row's absmax, the float16 cast before it, and
        # the float32 products of (de)quantization.
        row_scale = scales.double()[:, None]
        bound = row_scale / 254 + (half.double() - merged.double()).abs() + 4 * U32 * row_scale
        return Quantized({"CB": codes, "SCB": scales}, values, bound)

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


def _stored_absmax(state: Any) -> torch.Tensor:
    """Per-block absmax as dequantization uses it (a nested one dequantized), float32."""
    import bitsandbytes.functional as bnb_functional

    absmax: torch.Tensor = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    absmax = getattr(value, "absmax", None)  # a QuantState
    nested = getattr(value, "state2", None)
    return _nbytes(absmax) + (_nbytes(nested) if nested is not None else 0)
