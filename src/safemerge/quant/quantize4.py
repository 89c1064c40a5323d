"""bitsandbytes' CPU 4-bit quantizer, vectorised: the same bytes, several times faster.

bitsandbytes 0.50 quantizes a 4-bit weight on the CPU with its ``default`` kernel
(``backends/default/ops.py``): per block of ``blocksize`` values in flat order, the
absmax ``s``; ``x = clamp(y * (1 / max(s, 1e-38)), -1, 1)`` (the ragged last block
divides instead: ``clamp(y / max(s, 1e-38), -1, 1)``, and stores the clamped ``s``);
code index ``torch.bucketize(x, midpoints)``, the number of midpoints between adjacent
sorted codes that lie strictly below ``x`` (FP4 then maps it through the code's sort
order); two codes a byte, the first in the high nibble. ``bucketize`` is a binary search
per element and most of the time of a merge into an NF4 model.

This module computes the same ``x`` with the same float32 operations and replaces the
search by two table lookups. The interval ``[-1, 1]`` is cut into ``CELLS`` equal cells,
narrow enough that no cell, widened by more than the rounding of ``(x + 1) * CELLS / 2``,
holds two different midpoints (checked when the tables are built). Within a cell the
count of midpoints below ``x`` is then the count below the cell plus whether ``x`` lies
above the cell's one midpoint, a float32 comparison against the very midpoint tensor
bitsandbytes searches. Midpoints and sort order are bitsandbytes' own tensors; the
absmax is a max (exact), so the packed bytes and the absmax are bitsandbytes' bit for
bit. The quant state (nested absmax included) is then built by bitsandbytes' own code
from that absmax. ``tests/safemerge/test_quantize4.py`` compares both byte for byte over
random and adversarial inputs.

It applies only where bitsandbytes itself would run that default kernel (a CPU tensor,
no CPU-specific ``quantize_4bit`` registered) and to finite inputs; everything else goes
to ``bitsandbytes.functional.quantize_4bit``.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from safemerge.merge import engine, kernel
from safemerge.quant.grid import CODES

#: Cells of ``[-1, 1]``. FP4's closest midpoints (around its two zeros) are 0.0026 apart;
#: a cell is 2 / 1024 = 0.00195 wide.
CELLS = 1024
#: Elements quantized per step: small enough for each step's temporaries to stay in cache.
CHUNK = 1 << 16
#: bitsandbytes' lower clamp of an absmax before it divides by it.
_TINY_ABSMAX = 1e-38


@dataclass(frozen=True, eq=False)
class Quantization:
    """bitsandbytes' 4-bit quantization of a tensor, with what the fuse checks it against.

    Attributes:
        packed: the codes two a byte, high nibble first, shaped and typed as bitsandbytes'.
        state: bitsandbytes' ``QuantState`` (its own object, built by its own code).
        values: ``code * absmax`` per element as dequantization computes it (float32, the
            input's shape; the absmax a nested state stores, dequantized).
        true_absmax: ``max|y|`` per block, float32, unclamped.
    """

    packed: torch.Tensor
    state: Any
    values: torch.Tensor
    true_absmax: torch.Tensor


def quantize_4bit(
    merged: torch.Tensor, blocksize: int, nested: bool, quant_type: str, storage: torch.dtype
) -> Quantization | None:
    """``bitsandbytes.functional.quantize_4bit(merged, blocksize=blocksize,
    compress_statistics=nested, quant_type=quant_type, quant_storage=storage)``, bit for
    bit; None where this module does not apply (not bitsandbytes' default CPU kernel, a
    non-finite value, no values): call bitsandbytes then."""
    if not _applies(merged, quant_type):
        return None
    tables = _tables(quant_type)
    if tables is None:
        return None
    flat = merged.reshape(-1).float()
    count = flat.numel()
    full = count - count % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    true_absmax = blocks.abs().amax(dim=1)
    tail = flat[full:]
    if tail.numel():
        true_absmax = torch.cat([true_absmax, tail.abs().amax().reshape(1)])
    if not bool(torch.isfinite(true_absmax).all()):
        return None  # bitsandbytes' own handling of inf/NaN, whatever it is
    # bitsandbytes stores the ragged last block's absmax clamped (it divides by it).
    absmax = torch.cat(
        [true_absmax[: blocks.shape[0]], true_absmax[blocks.shape[0] :].clamp(min=_TINY_ABSMAX)]
    )
    state = _state(merged, absmax, blocksize, nested, quant_type)
    scales = stored_absmax(state).reshape(-1, 1)  # what dequantization multiplies by
    codes = torch.empty(count + count % 2, dtype=torch.uint8)
    values = torch.empty(count, dtype=torch.float32)
    # bitsandbytes' exact expression: a float32 reciprocal, then a product per element.
    reciprocal = 1.0 / absmax[: blocks.shape[0]].clamp(min=_TINY_ABSMAX).view(-1, 1)
    # Compiled where the kernel is built, else torch ops a cache-sized chunk at a time.
    if kernel.compiled():
        _compiled_lookup(blocks, reciprocal, scales, tables, codes[:full], values[:full])
    else:
        for rows in _row_ranges(blocks.shape[0], max(1, CHUNK // blocksize)):
            scaled = (blocks[rows] * reciprocal[rows]).clamp_(-1, 1)
            at = slice(rows.start * blocksize, rows.stop * blocksize)
            _lookup(scaled, scales[rows], tables, codes[at], values[at].view(-1, blocksize))
    if tail.numel():
        scaled = torch.clamp(tail / absmax[-1:], -1, 1).reshape(1, -1)
        _lookup(scaled, scales[-1:], tables, codes[full:count], values[full:].view(1, -1))
    if count % 2:  # bitsandbytes pads the scaled values with a zero
        codes[count:] = _code_of_zero(tables)
    return Quantization(_pack(codes, storage), state, values.reshape(merged.shape), true_absmax)


def stored_absmax(state: Any) -> torch.Tensor:
    """Per-block absmax as dequantization uses it (a nested one dequantized), float32."""
    import bitsandbytes.functional as bnb_functional

    absmax: torch.Tensor = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def _pack(codes: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Two codes a byte, high nibble first, shaped and typed as bitsandbytes packs them."""
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    if storage != torch.uint8:
        packed = packed.squeeze().view(storage).unsqueeze(1)
    return packed


def _compiled_lookup(
    blocks: torch.Tensor,
    reciprocal: torch.Tensor,
    scales: torch.Tensor,
    tables: _Tables,
    codes: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """The scaling and :func:`_lookup` of every row of ``blocks`` by the compiled kernel,
    the rows shared out to the engine's block threads."""
    count, blocksize = blocks.shape
    blocks, reciprocal = blocks.contiguous(), reciprocal.reshape(-1).contiguous()
    scales = scales.reshape(-1)[:count].contiguous()
    step = max(1, CHUNK // blocksize)
    parts = iter(_row_ranges(count, step))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                rows = next(parts, None)
            if rows is None:
                return
            at = slice(rows.start * blocksize, rows.stop * blocksize)
            kernel.lookup_4bit(
                blocks[rows],
                reciprocal[rows],
                scales[rows],
                CELLS / 2,
                tables.midpoint,
                tables.code,
                tables.value,
                codes[at],
                values[at],
            )

    engine.on_threads(work, min(engine.block_threads(), -(-count // step)))


def _row_ranges(count: int, step: int) -> list[slice]:
    """Rows ``0:count`` in slices of ``step``."""
    return [slice(first, min(first + step, count)) for first in range(0, count, step)]


def _lookup(
    scaled: torch.Tensor,
    scales: torch.Tensor,
    tables: _Tables,
    codes: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Code indices of ``scaled`` (rows of values in ``[-1, 1]``; bitsandbytes'
    ``bucketize`` and order) into ``codes``, and ``code * scale`` per row into ``values``."""
    flat = scaled.reshape(-1)
    cell = (flat + 1.0).mul_(CELLS / 2).to(torch.int32)  # 0 to CELLS (x = 1)
    above = flat > tables.midpoint.index_select(0, cell)
    index = cell.mul_(2).add_(above)
    torch.index_select(tables.code, 0, index, out=codes)
    torch.index_select(tables.value, 0, index, out=values.view(-1))
    values.mul_(scales)


def _code_of_zero(tables: _Tables) -> torch.Tensor:
    """The code index of a scaled 0 (bitsandbytes' padding), looked up like any value."""
    code = torch.empty(1, dtype=torch.uint8)
    _lookup(torch.zeros(1, 1), torch.ones(1, 1), tables, code, torch.empty(1, 1))
    return code


@dataclass(frozen=True)
class _Tables:
    """Per cell of ``[-1, 1]``; ``code`` and ``value`` indexed by ``2 * cell + above``."""

    midpoint: torch.Tensor  # float32 per cell (CELLS + 1): its one midpoint, or +inf
    code: torch.Tensor  # uint8: the code index
    value: torch.Tensor  # float32: the code's value


@functools.cache
def _tables(quant_type: str) -> _Tables | None:
    """The lookup tables; None when some cell would hold two different midpoints (not for
    NF4 or FP4)."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    midpoints, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    points = midpoints.double()
    # (x + 1) rounds by at most 2**-23 (x + 1 <= 2); * CELLS / 2 and truncation are exact.
    # Every x that lands in a cell lies within [low, high].
    slack = 2.0**-22
    # One cell more than CELLS: x = 1 lands in cell CELLS, [1, 1 + 2 / CELLS].
    edges = torch.arange(CELLS + 2, dtype=torch.float64) * (2.0 / CELLS) - 1
    low, high = (edges[:-1] - slack)[:, None], (edges[1:] + slack)[:, None]
    inside = (points >= low) & (points <= high)  # (CELLS, midpoints)
    # Two midpoints in one cell must be equal (then both lie below or above any x alike).
    first_inside = torch.where(inside, points, torch.inf).amin(dim=1)
    last_inside = torch.where(inside, points, -torch.inf).amax(dim=1)
    has_one = inside.any(dim=1)
    if bool((has_one & (first_inside != last_inside)).any()):
        return None
    midpoint = torch.where(has_one, first_inside, torch.inf)
    # bucketize counts the midpoints strictly below x: for x <= the cell's midpoint, those
    # below it; for x above, those up to it. A cell without one: those below the cell.
    below = torch.where(has_one, (points < midpoint[:, None]).sum(1), (points < low).sum(1))
    not_above = torch.where(has_one, (points <= midpoint[:, None]).sum(1), below)
    index = torch.stack([below, not_above], dim=1).reshape(-1)
    code = index if quant_type == "nf4" else order.cpu()[index]  # bitsandbytes remaps FP4
    value = torch.tensor(CODES[quant_type], dtype=torch.float32)[code]
    return _Tables(midpoint.float(), code.to(torch.uint8), value)


def _applies(values: torch.Tensor, quant_type: str) -> bool:
    """Whether bitsandbytes would quantize ``values`` with its default (CPU) kernel."""
    return (
        values.device.type == "cpu"
        and values.numel() > 0
        and values.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and quant_type in ("nf4", "fp4")
        and not _cpu_kernel_registered()
    )


@functools.cache
def _cpu_kernel_registered() -> bool:
    """A CPU-specific ``quantize_4bit`` (a later bitsandbytes) would replace the default
    kernel this module copies."""
    import bitsandbytes  # noqa: F401  (registers the operator)

    return bool(
        torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::quantize_4bit", "CPU")
    )


def _state(
    merged: torch.Tensor, absmax: torch.Tensor, blocksize: int, nested: bool, quant_type: str
) -> Any:
    """The ``QuantState`` ``bitsandbytes.functional.quantize_4bit`` builds around ``absmax``
    (its own code, so the nested absmax, offset and ``state2`` are its own)."""
    import bitsandbytes.functional

    bnb_functional: Any = bitsandbytes.functional  # untyped

    code = bnb_functional.get_4bit_type(quant_type, device=merged.device)
    if not nested:
        return bnb_functional.QuantState(
            absmax=absmax,
            shape=merged.shape,
            dtype=merged.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
        )
    offset = absmax.mean()
    nested_absmax, state2 = bnb_functional.quantize_blockwise(absmax - offset, blocksize=256)
    return bnb_functional.QuantState(
        absmax=nested_absmax,
        shape=merged.shape,
        dtype=merged.dtype,
        blocksize=blocksize,
        code=code,
        quant_type=quant_type,
        offset=offset,
        state2=state2,
    )
