"""The exact-unfuse correction: codes, escapes and packing give back every bit."""

from __future__ import annotations

import pytest
import torch

from safemerge.merge.correction import CorrectionBuilder, _pack, _unpack, escape_positions
from safemerge.merge.numerics import SUPPORTED_DTYPES, int_view


def _random_bits(dtype: torch.dtype, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    int_dtype = int_view(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(int_dtype)
    return torch.randint(info.min, info.max, (count,), generator=generator).to(int_dtype)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("count", [1, 3, 4, 17, 1000])
def test_restores_every_bit_pattern(dtype: torch.dtype, count: int) -> None:
    original_bits = _random_bits(dtype, count, seed=count)
    # Mostly 0 or +-1 steps away, with some arbitrary patterns (escapes, sign crossings).
    generator = torch.Generator().manual_seed(1)
    steps = torch.randint(-1, 2, (count,), generator=generator).to(original_bits.dtype)
    unfused_bits = original_bits - steps
    wild = torch.rand(count, generator=generator) < 0.1
    unfused_bits[wild] = _random_bits(dtype, count, seed=2)[wild]
    original, unfused = original_bits.view(dtype), unfused_bits.view(dtype)

    builder = CorrectionBuilder(count, dtype)
    builder.add(0, original, unfused)
    correction = builder.build()

    restored = correction.apply(0, unfused)
    assert torch.equal(int_view(restored), original_bits)


def test_blocks_are_independent_and_escapes_stay_in_order() -> None:
    dtype = torch.bfloat16
    original_bits = _random_bits(dtype, 40, seed=3)
    unfused_bits = _random_bits(dtype, 40, seed=4)  # almost every element escapes
    builder = CorrectionBuilder(40, dtype)
    for start in (0, 12, 24):
        stop = min(start + 12, 40)
        builder.add(
            start, original_bits[start:stop].view(dtype), unfused_bits[start:stop].view(dtype)
        )
    builder.add(36, original_bits[36:].view(dtype), unfused_bits[36:].view(dtype))
    correction = builder.build()
    for start, stop in ((24, 36), (0, 12), (36, 40), (12, 24)):  # any order
        restored = correction.apply(start, unfused_bits[start:stop].view(dtype))
        assert torch.equal(int_view(restored), original_bits[start:stop])


def test_signed_zero_nan_and_infinity_round_trip() -> None:
    dtype = torch.float16
    original = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0, 6e-8], dtype=dtype
    )
    unfused = torch.tensor([-0.0, 0.0, 1.0, 65504.0, -65504.0, -1.0, 1.0, -6e-8], dtype=dtype)
    builder = CorrectionBuilder(original.numel(), dtype)
    builder.add(0, original, unfused)
    restored = builder.build().apply(0, unfused)
    assert torch.equal(int_view(restored), int_view(original))


def test_size_is_a_quarter_byte_per_element_plus_escapes() -> None:
    dtype = torch.bfloat16
    original = torch.randn(1000).to(dtype)
    builder = CorrectionBuilder(1000, dtype)
    builder.add(0, original, original)  # nothing to correct
    correction = builder.build()
    assert correction.escape_count == 0
    assert correction.packed_codes.numel() == 250
    assert correction.nbytes == 250 + 2 * 8  # codes + one block's offset and escape start


def test_unknown_block_offset_is_refused() -> None:
    builder = CorrectionBuilder(8, torch.float32)
    builder.add(0, torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="offset 4"):
        builder.build().apply(4, torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_pack_unpack_round_trip_for_every_byte(dtype: torch.dtype) -> None:
    # All 256 combinations of four codes, then a ragged tail.
    every_byte = torch.arange(256)
    quads = torch.stack([(every_byte >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)
    codes = torch.cat([quads, torch.tensor([3, 1, 2])]).to(dtype)
    packed = _pack(codes)
    assert torch.equal(packed[:256], every_byte.to(torch.uint8))
    assert torch.equal(_unpack(packed, codes.numel()).to(dtype), codes)


@pytest.mark.parametrize("escape_rate", [0.0, 0.001, 0.02, 0.5, 1.0])
@pytest.mark.parametrize("count", [1, 4, 31, 32, 33, 129, 4099])
def testescape_positions_are_every_escape_code_in_order(escape_rate: float, count: int) -> None:
    # Lengths around the eight-byte words the search starts with, escapes from none to all.
    generator = torch.Generator().manual_seed(count)
    codes = torch.randint(0, 4, (count,), generator=generator, dtype=torch.uint8)
    codes[codes == 2] = 0
    codes[torch.rand(count, generator=generator) < escape_rate] = 2
    expected = (codes == 2).nonzero().flatten()
    assert torch.equal(escape_positions(_pack(codes)), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("escaping_blocks", [(), (0,), (1,), (2,), (0, 2), (0, 1, 2)])
def test_blocks_with_and_without_escapes_restore_exactly(
    dtype: torch.dtype, escaping_blocks: tuple[int, ...]
) -> None:
    # Blocks without escapes skip the search for them: the first, a middle and the last
    # block (whose escapes run to the end of the kept bits) each with and without.
    block, count = 64, 160
    original_bits = _random_bits(dtype, count, seed=3)
    generator = torch.Generator().manual_seed(4)
    unfused_bits = original_bits - torch.randint(-1, 2, (count,), generator=generator).to(
        original_bits.dtype
    )
    for index in escaping_blocks:
        unfused_bits[index * block + 5] ^= 0x70  # several steps away: an escape
    original, unfused = original_bits.view(dtype), unfused_bits.view(dtype)
    builder = CorrectionBuilder(count, dtype)
    for offset in range(0, count, block):
        builder.add(offset, original[offset : offset + block], unfused[offset : offset + block])
    correction = builder.build()
    assert correction.escape_count == len(escaping_blocks)
    for offset in range(0, count, block):
        restored = correction.apply(offset, unfused[offset : offset + block])
        assert torch.equal(int_view(restored), original_bits[offset : offset + block])
