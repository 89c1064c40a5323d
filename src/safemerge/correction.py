"""The compact correction that turns an arithmetic unfuse into an exact one.

After a fuse, unfusing by subtraction gives ``U = cast(float32(N) - delta)``, which differs
from the original weight ``W`` by a few ulps at most places (mostly 0 or +-1). The
correction stores, per element, the ulp distance ``k = ord(W) - ord(U)`` as a 2-bit code
(0, +1, -1, or "escape"), four to a byte, and the exact original bits of the rare
escaped elements in the order they occur (the codes say where they go, so no index is
stored). It costs a quarter byte per element plus one weight element per escape, and
lives on the CPU whatever the weight's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safemerge.numerics import from_ordered_bits, int_view, ordered_bits

_ESCAPE = 3
#: code -> ulp step; the escape code's step is irrelevant (its bits are stored exactly).
_STEP_OF_CODE = torch.tensor([0, 1, -1, 0], dtype=torch.int64)
#: (k clamped to [-2, 2]) + 2 -> code
_CODE_OF_STEP = torch.tensor([_ESCAPE, 2, 0, 1, _ESCAPE], dtype=torch.uint8)
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


@dataclass(frozen=True, eq=False)
class Correction:
    """Per-element ulp corrections for one tensor, in flat row-major order."""

    dtype: torch.dtype
    numel: int
    packed_codes: torch.Tensor
    escape_bits: torch.Tensor
    block_offsets: torch.Tensor
    block_escape_starts: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = (self.packed_codes, self.escape_bits, self.block_offsets, self.block_escape_starts)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def escape_count(self) -> int:
        return int(self.escape_bits.numel())

    def apply(self, offset: int, unfused: torch.Tensor) -> torch.Tensor:
        """Exact original values for the elements ``[offset, offset + unfused.numel())``.

        ``offset`` must be the start of a block recorded by :class:`CorrectionBuilder`.
        """
        count = unfused.numel()
        codes = _unpack(self.packed_codes[offset // 4 : math.ceil((offset + count) / 4)], count)
        codes = codes.to(unfused.device).long()
        ordered = ordered_bits(unfused.reshape(-1))
        steps = _STEP_OF_CODE.to(unfused.device)[codes].to(ordered.dtype)
        restored = from_ordered_bits(ordered + steps, self.dtype)
        positions = (codes == _ESCAPE).nonzero().reshape(-1)
        if positions.numel():
            block = int(torch.searchsorted(self.block_offsets, offset))
            if block >= self.block_offsets.numel() or int(self.block_offsets[block]) != offset:
                raise ValueError(f"offset {offset} is not the start of a recorded block")
            first = int(self.block_escape_starts[block])
            bits = self.escape_bits[first : first + positions.numel()].to(unfused.device)
            int_view(restored)[positions] = bits
        return restored.reshape(unfused.shape)


class CorrectionBuilder:
    """Accumulates a :class:`Correction` block by block during a fuse."""

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self._dtype = dtype
        self._numel = numel
        self._packed = torch.zeros(math.ceil(numel / 4), dtype=torch.uint8)
        self._escape_bits: list[torch.Tensor] = []
        self._block_offsets: list[int] = []
        self._block_escape_starts: list[int] = []
        self._escapes = 0

    def add(self, offset: int, original: torch.Tensor, unfused: torch.Tensor) -> None:
        """Record the block ``[offset, offset + numel)``; ``offset`` a multiple of 4."""
        original_flat = original.reshape(-1)
        steps = ordered_bits(original_flat) - ordered_bits(unfused.reshape(-1))
        codes = _CODE_OF_STEP.to(steps.device)[steps.clamp(-2, 2) + 2]
        self._packed[offset // 4 : offset // 4 + math.ceil(codes.numel() / 4)] = _pack(codes).cpu()
        self._block_offsets.append(offset)
        self._block_escape_starts.append(self._escapes)
        positions = (codes == _ESCAPE).nonzero().reshape(-1)
        if positions.numel():
            self._escape_bits.append(int_view(original_flat)[positions].cpu())
            self._escapes += positions.numel()

    def build(self) -> Correction:
        bits_dtype = int_view(torch.empty(0, dtype=self._dtype)).dtype
        bits = torch.cat(self._escape_bits) if self._escape_bits else torch.empty(0, dtype=bits_dtype)
        return Correction(
            dtype=self._dtype,
            numel=self._numel,
            packed_codes=self._packed,
            escape_bits=bits,
            block_offsets=torch.tensor(self._block_offsets, dtype=torch.int64),
            block_escape_starts=torch.tensor(self._block_escape_starts, dtype=torch.int64),
        )


def _pack(codes: torch.Tensor) -> torch.Tensor:
    padding = (-codes.numel()) % 4
    if padding:
        codes = torch.cat([codes, codes.new_zeros(padding)])
    quads = codes.reshape(-1, 4) << _SHIFTS.to(codes.device)
    return quads[:, 0] | quads[:, 1] | quads[:, 2] | quads[:, 3]


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    codes = (packed.reshape(-1, 1) >> _SHIFTS) & 3
    return codes.reshape(-1)[:count]
