"""The compact correction that turns an arithmetic unfuse into an exact one.

After a fuse, unfusing by subtraction gives ``U = cast(float32(N) - delta)``, which differs
from the original weight ``W`` in the last bit at many places. The correction stores, per
element, the difference of the bit patterns ``d = bits(W) - bits(U)`` (integer arithmetic
modulo 2**width, so ``bits(U) + d`` gives back ``bits(W)`` whatever the signs) as a 2-bit
code: 0, +1, -1, or "escape". Codes are packed four to a byte; escaped elements keep
their exact original bits, in the order they occur (the codes say where they go, so no
index is stored). Cost: a quarter byte per element plus one element per escape, on the
CPU whatever the weight's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safemerge.merge.numerics import int_view

# Codes are ``clamp(d, -2, 2) mod 4``: 0 -> 0, +1 -> 1, -1 -> 3, and +-2 (meaning "two or
# more steps away") -> 2, the escape.
_SLOT_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _steps_of_byte_table() -> torch.Tensor:
    """For each packed byte, its four steps as int8, the four bytes read as one int32.

    One int32 gather per packed byte then yields four steps at once (an int64 lookup per
    code, with its conversions, was most of an exact unfuse). An escape's step is 0: the
    escaped element is overwritten with its kept bits anyway.
    """
    codes = (torch.arange(256, dtype=torch.uint8)[:, None] >> _SLOT_SHIFTS) & 3
    steps = torch.tensor([0, 1, 0, -1], dtype=torch.int8)[codes.long()]
    # Viewing the (256, 4) int8 rows as int32 and back keeps the bytes in memory order,
    # whatever the machine's endianness.
    return steps.contiguous().view(torch.int32).reshape(256)


_STEPS_OF_BYTE = _steps_of_byte_table()


@dataclass(frozen=True, eq=False)
class Correction:
    """Per-element bit corrections for one tensor, in flat row-major order."""

    dtype: torch.dtype
    numel: int
    packed_codes: torch.Tensor
    escape_bits: torch.Tensor
    block_offsets: torch.Tensor
    block_escape_starts: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = (
            self.packed_codes,
            self.escape_bits,
            self.block_offsets,
            self.block_escape_starts,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def escape_count(self) -> int:
        """Elements two or more bit steps away, kept whole."""
        return int(self.escape_bits.numel())

    def apply(self, offset: int, unfused: torch.Tensor) -> torch.Tensor:
        """Exact original values for the elements ``[offset, offset + unfused.numel())``.

        ``offset`` must be the start of a block recorded by :class:`CorrectionBuilder`.
        """
        block = self._block_at(offset)
        count = unfused.numel()
        packed = self.packed_codes[offset // 4 : math.ceil((offset + count) / 4)].to(unfused.device)
        bits = int_view(unfused.contiguous()).reshape(-1)
        # int + int8 promotes to the bits' width and wraps modulo 2**width, as the
        # difference was taken.
        restored_bits = torch.add(bits, steps_of(packed, count))
        if self._block_has_escapes(block):
            positions = escape_positions(packed)
            first = int(self.block_escape_starts[block])
            originals = self.escape_bits[first : first + positions.numel()]
            restored_bits[positions] = originals.to(unfused.device)
        return restored_bits.view(self.dtype).reshape(unfused.shape)

    def block(self, offset: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed codes and the escaped original bits of the block at ``offset`` of
        ``count`` elements (views, for the compiled kernel to apply)."""
        block = self._block_at(offset)
        packed = self.packed_codes[offset // 4 : math.ceil((offset + count) / 4)]
        first = int(self.block_escape_starts[block])
        last = (
            int(self.block_escape_starts[block + 1])
            if block + 1 < self.block_escape_starts.numel()
            else self.escape_count
        )
        return packed, self.escape_bits[first:last]

    def _block_at(self, offset: int) -> int:
        block = int(torch.searchsorted(self.block_offsets, offset))
        if block >= self.block_offsets.numel() or int(self.block_offsets[block]) != offset:
            raise ValueError(f"offset {offset} is not the start of a recorded correction block")
        return block

    def _block_has_escapes(self, block: int) -> bool:
        # The escapes of a block sit between its first escape and the next block's: with
        # none, the search of its codes for escapes is skipped.
        first = int(self.block_escape_starts[block])
        if block + 1 < self.block_escape_starts.numel():
            return int(self.block_escape_starts[block + 1]) > first
        return self.escape_count > first


def assembled(
    dtype: torch.dtype,
    packed: torch.Tensor,
    original: torch.Tensor,
    block_elements: int,
    pin: bool,
) -> Correction:
    """The correction of a whole layer whose codes were made on its device: ``packed``
    for all of ``original`` (the weight before the fuse), in blocks of ``block_elements``.

    The search for the layer's escapes waits for the device once (``nonzero`` must know
    its count); the codes and escapes go to host memory, pinned if ``pin``, as copies
    queued without a wait of their own, and the last copy (the blocks' escape starts)
    returns when all of them are done.
    """
    numel = original.numel()
    positions = escape_positions(packed)
    escape_bits = int_view(original.contiguous()).reshape(-1).index_select(0, positions)
    offsets = torch.arange(0, max(numel, 1), block_elements, dtype=torch.int64)
    starts = torch.searchsorted(positions, offsets.to(positions.device))
    return Correction(
        dtype=dtype,
        numel=numel,
        packed_codes=_to_host(packed, pin),
        escape_bits=_to_host(escape_bits, pin),
        block_offsets=offsets,
        block_escape_starts=starts.cpu(),
    )


def _to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
    return host.copy_(tensor, non_blocking=pin)


class CorrectionBuilder:
    """Accumulates a :class:`Correction` block by block during a fuse.

    Blocks may be recorded in any order and from several threads at once (each writes its
    own bytes of the packed codes; the escapes are put in order when the correction is
    built).
    """

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self._dtype = dtype
        self._numel = numel
        self._packed = torch.zeros(math.ceil(numel / 4), dtype=torch.uint8)
        self._escapes_by_offset: dict[int, torch.Tensor] = {}

    def add(self, offset: int, original: torch.Tensor, unfused: torch.Tensor) -> None:
        """Record the block ``[offset, offset + numel)``; ``offset`` a multiple of 4."""
        packed = packed_codes(original, unfused)
        self._packed[offset // 4 : offset // 4 + packed.numel()] = packed.cpu()
        original_bits = int_view(original.contiguous()).reshape(-1)
        self.record(offset, original_bits[escape_positions(packed)].cpu())

    def packed_codes(self, offset: int, count: int) -> torch.Tensor:
        """The bytes of the block at ``offset`` of ``count`` elements, for the compiled
        kernel to write in place (it then calls :meth:`record`)."""
        return self._packed[offset // 4 : math.ceil((offset + count) / 4)]

    def record(self, offset: int, escape_bits: torch.Tensor) -> None:
        """Record the block at ``offset``, its codes written, with its escapes' bits."""
        self._escapes_by_offset[offset] = escape_bits

    def build(self) -> Correction:
        offsets = sorted(self._escapes_by_offset)
        escapes = [self._escapes_by_offset[offset] for offset in offsets]
        counts = torch.tensor([0] + [bits.numel() for bits in escapes], dtype=torch.int64)
        bits_dtype = int_view(torch.empty(0, dtype=self._dtype)).dtype
        return Correction(
            dtype=self._dtype,
            numel=self._numel,
            packed_codes=self._packed,
            escape_bits=torch.cat(escapes) if escapes else torch.empty(0, dtype=bits_dtype),
            block_offsets=torch.tensor(offsets, dtype=torch.int64),
            block_escape_starts=counts.cumsum(0)[:-1],
        )


def packed_codes(original: torch.Tensor, unfused: torch.Tensor) -> torch.Tensor:
    """The packed codes that take ``unfused``'s bits back to ``original``'s, on their device."""
    steps = int_view(original.contiguous()).reshape(-1) - int_view(unfused.contiguous()).reshape(-1)
    # clamp(d, -2, 2) as uint8 is 0, 1, 2, 254, 255: its low two bits are the code.
    return _pack(steps.clamp_(-2, 2).to(torch.uint8))


def steps_of(packed: torch.Tensor, count: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``count`` codes' steps (int8, an escape's 0), on ``packed``'s device.

    ``table`` is :func:`steps_table` on that device, for callers that apply many blocks
    there (each copy of the table to a GPU would wait for it).
    """
    table = steps_table(packed.device) if table is None else table
    return table.index_select(0, packed.int()).view(torch.int8)[:count]


def steps_table(device: torch.device) -> torch.Tensor:
    """The byte-to-four-steps table (see :func:`_steps_of_byte_table`) on ``device``."""
    return _STEPS_OF_BYTE.to(device)


# Four consecutive one-byte codes read as a little-endian int32 hold code j at bit 8j.
# Multiplying by 2**24 + 2**18 + 2**12 + 2**6 puts a copy of code j at bit 24 + 2j (the
# other copies land below bit 24 without overlapping, or past bit 31 and wrap away), so
# the byte at bit 24 is the four codes packed. (int32 arithmetic: several times faster
# than int64 on CPUs, which lack a vector int64 multiply.)
_PACKING_MULTIPLIER = (1 << 24) + (1 << 18) + (1 << 12) + (1 << 6)


# Keeps the low two bits of each of the four bytes of an int32.
_CODE_BITS_OF_FOUR = 0x03030303


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Four codes (any integer dtype) to a byte, first code lowest.

    Only each code's low two bits count (so ``-1`` packs as 3): they are masked four codes
    at a time, on the int32 view of the uint8 codes.
    """
    codes = codes.to(torch.uint8)  # no copy when the codes are uint8 already
    padding = (-codes.numel()) % 4
    if padding:
        codes = torch.cat([codes, codes.new_zeros(padding)])
    four_codes = codes.view(torch.int32) & _CODE_BITS_OF_FOUR
    return ((four_codes * _PACKING_MULTIPLIER) >> 24).to(torch.uint8)


def escape_positions(packed: torch.Tensor) -> torch.Tensor:
    """Element positions of the escape codes in packed bytes, in increasing order.

    A slot holds the escape, binary 10, where its high bit is set and its low bit is not.
    Escapes are rare (well under 1% of elements in a typical fuse), so the search narrows
    down in three steps, each over a small fraction of the last: eight bytes at a time
    (as int64 words), then the bytes of the words with an escape, then the four slots of
    the bytes with one. ``nonzero`` costs per element searched, so this is several times
    less work than searching every byte (and sixteen times less than every code).
    """
    flags = (packed >> 1) & ~packed & 0x55
    padding = (-flags.numel()) % 8
    if padding:
        flags = torch.cat([flags, flags.new_zeros(padding)])
    words = flags.view(torch.int64)
    word_index = words.nonzero().flatten()
    if word_index.numel() == 0:
        return word_index
    # Through the uint8 view the bytes keep their memory order, whatever the endianness.
    word_bytes = words.index_select(0, word_index).view(torch.uint8)
    byte_in_words = word_bytes.nonzero().flatten()
    byte_flags = word_bytes.index_select(0, byte_in_words)
    byte_index = word_index.index_select(0, byte_in_words >> 3).mul_(8).add_(byte_in_words & 7)
    slots = byte_flags[:, None] >> _SLOT_SHIFTS.to(packed.device)
    which_byte, slot = (slots & 1).nonzero().unbind(1)
    return byte_index.index_select(0, which_byte).mul_(4).add_(slot)


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` codes of packed bytes, as uint8 (the inverse of :func:`_pack`)."""
    codes = (packed.reshape(-1, 1) >> _SLOT_SHIFTS.to(packed.device)) & 3
    return codes.reshape(-1)[:count]
