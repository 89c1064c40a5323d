"""safemerge's vectorised 4-bit quantizer against bitsandbytes' own, byte for byte.

``safemerge.quant.quantize4`` replaces ``bitsandbytes.functional.quantize_4bit`` on the
CPU. Every case here quantizes the same tensor with both and compares the packed bytes
(dtype, shape and bits) and every tensor and setting of the quant state, nested absmax,
offset and ``state2`` included, plus the dequantized values the fuse checks.

Inputs (Hypothesis, with an event per family so that a run shows they were generated):
random magnitudes from 1e-30 to 1e30; exact ties (a block's absmax a power of two and
its values midpoints between two codes times it, so the scaled value *is* the midpoint)
and values one or two float32 steps either side; zeros, all-zero and all-equal blocks;
huge (near float32's max) and subnormal values; shapes whose blocks straddle rows and
whose last block is ragged; float32, float16 and bfloat16 inputs; every blocksize
bitsandbytes accepts; NF4 and FP4; nested or not; uint8 and wider quant storages.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from safemerge.merge import kernel
from safemerge.quant import quantize4
from safemerge.quant.grid import CODES

bnb_functional = pytest.importorskip("bitsandbytes.functional")
default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FAMILIES = ("random", "ties", "zeros", "equal", "extremes")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGES = (torch.uint8, torch.float32, torch.bfloat16, torch.int8)


def _midpoints(quant_type: str) -> torch.Tensor:
    midpoints, _ = default_ops._get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    result: torch.Tensor = midpoints
    return result


def _values(family: str, count: int, blocksize: int, quant_type: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-count // blocksize)
    if family == "random":
        exponent = torch.randint(-30, 31, (blocks, 1), generator=generator).double()
        values = torch.randn(blocks, blocksize, generator=generator).double() * 10**exponent
        return values.float().reshape(-1)[:count]
    if family == "ties":
        # Scale 2**k per block: 1 / s and m * s are exact, so y / s is the midpoint m.
        scale = 2.0 ** torch.randint(-20, 21, (blocks, 1), generator=generator).float()
        midpoints = _midpoints(quant_type)
        picks = midpoints[
            torch.randint(0, midpoints.numel(), (blocks, blocksize), generator=generator)
        ]
        sign = torch.where(torch.rand(blocks, blocksize, generator=generator) < 0.5, -1.0, 1.0)
        values = picks * sign * scale
        for steps, direction in ((1, torch.inf), (2, -torch.inf)):  # some a step or two off
            chosen = torch.rand(blocks, blocksize, generator=generator) < 0.15
            nudged = values
            for _ in range(steps):
                nudged = torch.nextafter(nudged, torch.full_like(nudged, direction))
            values = torch.where(chosen, nudged, values)
        values[:, 0] = scale[:, 0]  # the block's absmax is exactly its scale
        return values.reshape(-1)[:count]
    if family == "zeros":
        values = torch.randn(blocks, blocksize, generator=generator)
        values[torch.rand(blocks, generator=generator) < 0.5] = 0.0
        values[torch.rand(blocks, blocksize, generator=generator) < 0.3] = 0.0
        return values.reshape(-1)[:count]
    if family == "equal":
        level = torch.randn(blocks, 1, generator=generator) * 100
        return level.expand(blocks, blocksize).reshape(-1)[:count].clone()
    # extremes: near float32's max, subnormals, the smallest subnormal, mixed per block
    choices = torch.tensor([3.0e38, -3.4e38, 1.0e-40, -1.4e-45, 1.0e-38, 0.5, 0.0])
    picks = torch.randint(0, choices.numel(), (blocks, blocksize), generator=generator)
    values = choices[picks] * torch.rand(blocks, blocksize, generator=generator)
    values[torch.rand(blocks, generator=generator) < 0.3] = 1.0e-41  # all-subnormal blocks
    return values.reshape(-1)[:count]


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    # Columns below, at, or off a multiple of the blocksize: blocks that straddle rows.
    columns = draw(
        st.one_of(
            st.integers(1, 40),
            st.sampled_from((blocksize // 2, blocksize, 2 * blocksize, blocksize + 3)),
        )
    )
    rows = draw(st.integers(1, max(1, 6000 // columns)))
    return {
        "quant_type": draw(st.sampled_from(("nf4", "fp4"))),
        "blocksize": blocksize,
        "nested": draw(st.booleans()),
        "storage": draw(st.sampled_from(STORAGES)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "family": draw(st.sampled_from(FAMILIES)),
        "shape": (rows, columns),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _ties(values: torch.Tensor, blocksize: int, quant_type: str) -> int:
    """How many scaled values sit exactly on a midpoint (bitsandbytes' scaling)."""
    flat = values.reshape(-1).float()
    full = flat.numel() - flat.numel() % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    scaled = torch.clamp(blocks * (1.0 / absmax), -1, 1).reshape(-1)
    return int(torch.isin(scaled, _midpoints(quant_type)).sum())


def _assert_bit_identical(values: torch.Tensor, case: dict[str, Any]) -> quantize4.Quantization:
    blocksize, nested, quant_type = case["blocksize"], case["nested"], case["quant_type"]
    storage = case["storage"]
    expected, expected_state = bnb_functional.quantize_4bit(
        values,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )
    done = quantize4.quantize_4bit(values, blocksize, nested, quant_type, storage)
    assert done is not None
    assert done.packed.dtype == expected.dtype and done.packed.shape == expected.shape
    assert torch.equal(done.packed.view(torch.uint8), expected.view(torch.uint8))
    _assert_same_state(done.state, expected_state)
    # The values the fuse checks: code * absmax as dequantization computes it.
    absmax = quantize4.stored_absmax(expected_state)
    packed = expected.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: values.numel()]
    table = torch.tensor(CODES[quant_type], dtype=torch.float32)
    reference = table[codes.long()] * absmax.repeat_interleave(blocksize)[: values.numel()]
    assert torch.equal(done.values.reshape(-1).view(torch.int32), reference.view(torch.int32))
    flat = values.reshape(-1).float()
    true_absmax = torch.nn.functional.pad(flat.abs(), (0, (-flat.numel()) % blocksize))
    assert torch.equal(done.true_absmax, true_absmax.reshape(-1, blocksize).amax(dim=1))
    return done


def _assert_same_state(actual: Any, expected: Any) -> None:
    for name in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        assert getattr(actual, name) == getattr(expected, name), name
    for name in ("absmax", "code", "offset"):
        left, right = getattr(actual, name), getattr(expected, name)
        assert (left is None) == (right is None), name
        if left is not None:
            assert left.dtype == right.dtype and left.shape == right.shape, name
            assert torch.equal(
                left.reshape(-1).view(torch.uint8), right.reshape(-1).view(torch.uint8)
            )
    assert (actual.state2 is None) == (expected.state2 is None)
    if expected.state2 is not None:
        _assert_same_state(actual.state2, expected.state2)


#: The lookup in the compiled kernel (where built) and in torch ops: both are compared.
LOOKUP_PATHS = pytest.mark.parametrize("path", ["compiled", "torch ops"])


def lookup_path(path: str) -> AbstractContextManager[None]:
    if path == "compiled" and not kernel.compiled():
        pytest.skip("the compiled kernel is not built")
    return kernel.disabled() if path == "torch ops" else nullcontext()


@LOOKUP_PATHS
@given(case=cases())
def test_quantizer_is_bitsandbytes_bit_for_bit(case: dict[str, Any], path: str) -> None:
    rows, columns = case["shape"]
    blocksize, quant_type = case["blocksize"], case["quant_type"]
    count = rows * columns
    values = _values(case["family"], count, blocksize, quant_type, case["seed"])
    values = values.reshape(rows, columns).to(case["dtype"])
    if not bool(torch.isfinite(values).all()):  # a huge value past float16's range
        assert (
            quantize4.quantize_4bit(values, blocksize, case["nested"], quant_type, torch.uint8)
            is None
        )
        event("non-finite after the cast: bitsandbytes quantizes")
        return
    packed_bytes, itemsize = (count + 1) // 2, case["storage"].itemsize
    if packed_bytes % itemsize or packed_bytes // itemsize < 2:  # bitsandbytes cannot store it
        case = {**case, "storage": torch.uint8}
    event(f"storage {case['storage']}")
    event(f"family {case['family']}")
    event(f"{quant_type}, nested {case['nested']}, {case['dtype']}")
    event("blocks straddle rows" if columns % blocksize else "blocks within rows")
    event("ragged last block" if count % blocksize else "whole blocks")
    event("odd count" if count % 2 else "even count")
    ties = _ties(values, blocksize, quant_type)
    event("exact midpoint ties" if ties else "no exact ties")
    with lookup_path(path):
        _assert_bit_identical(values, case)


@LOOKUP_PATHS
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
def test_every_midpoint_and_its_neighbours(
    quant_type: str, blocksize: int, nested: bool, path: str
) -> None:
    """Every midpoint, exactly and one step either side, in blocks straddling rows with a
    ragged tail: the ties the generated cases aim at, made certain."""
    midpoints = _midpoints(quant_type)
    steps = torch.cat(
        [
            torch.nextafter(midpoints, torch.full_like(midpoints, -torch.inf)),
            midpoints,
            torch.nextafter(midpoints, torch.full_like(midpoints, torch.inf)),
        ]
    )
    block = torch.cat([torch.ones(1), steps, -steps])  # absmax 1: y / s == y exactly
    block = (
        torch.nn.functional.pad(block, (0, blocksize - block.numel()))
        if blocksize > block.numel()
        else block[:blocksize]
    )
    values = (block.repeat(3) * 0.25)[: 3 * blocksize - 5]  # 0.25: still exact
    case = {
        "quant_type": quant_type,
        "blocksize": blocksize,
        "nested": nested,
        "storage": torch.uint8,
    }
    assert _ties(values, blocksize, quant_type) > 0
    with lookup_path(path):
        _assert_bit_identical(values.reshape(1, -1), case)


def test_non_finite_values_and_other_devices_go_to_bitsandbytes() -> None:
    values = torch.ones(4, 64)
    values[1, 3] = torch.inf
    assert quantize4.quantize_4bit(values, 64, False, "nf4", torch.uint8) is None
    values[1, 3] = torch.nan
    assert quantize4.quantize_4bit(values, 64, True, "fp4", torch.uint8) is None
    assert (
        quantize4.quantize_4bit(torch.ones(4, 64, device="meta"), 64, False, "nf4", torch.uint8)
        is None
    )
    assert quantize4.quantize_4bit(torch.ones(0, 64), 64, False, "nf4", torch.uint8) is None


def test_lookup_tables_hold_one_midpoint_a_cell() -> None:
    for quant_type in ("nf4", "fp4"):
        assert quantize4._tables(quant_type) is not None
