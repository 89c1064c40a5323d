"""Fuse and unfuse on a GPU (any device but the CPU), waiting for the device once a layer.

The contract is the CPU engine's (:mod:`safemerge.merge.engine`): guarded, all or nothing,
exact unfuse from a correction. What differs is when the host looks at results. Every
read of a device value on the host (a guard verdict, a count of escapes) waits for the
device's queue to drain, and a wait per block would leave the device idle between blocks.
So here:

* the guard's verdicts are combined on the device, one boolean for the layer, read once
  after its last block;
* the merge goes into a new tensor, copied over the weight only once that verdict is
  read (an in-place fuse would need a verdict before each block is overwritten); the
  extra memory is one layer's weight, as in PEFT's own merge;
* the correction's codes are made on the device for the whole layer, and its escapes
  found by one search over them (:func:`safemerge.merge.correction.assembled`);
* an exact unfuse moves the layer's correction to the device once, applies every
  block's steps there and puts the escaped bits back with one scatter;
* blocks are larger (:data:`DEVICE_BLOCK_BYTES`): a GPU has memory to spare, and each
  block costs a dozen kernel launches.

The block products use torch's matmul (cuBLAS on CUDA), repeatable on one device with
the same block geometry, which the record keeps: an exact unfuse must run on the device
that fused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import partial

import torch

from safemerge.merge import guard
from safemerge.merge.blocks import Blocks, computed
from safemerge.merge.correction import (
    Correction,
    assembled,
    escape_positions,
    packed_codes,
    steps_of,
    steps_table,
)
from safemerge.merge.numerics import int_view, overflow_threshold

#: Bytes of float32 work per row block on a GPU.
DEVICE_BLOCK_BYTES = 64 * 1024 * 1024

_forced = False


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Take this path on the CPU too (for tests: CI has no GPU)."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def applies(device: torch.device) -> bool:
    return device.type != "cpu" or _forced


def wait_for(value: torch.Tensor) -> bool:
    """Read a boolean device value on the host: the one place this path waits."""
    return bool(value)


def fuse(
    blocks: Blocks, *, keep_correction: bool, in_place: bool
) -> tuple[torch.Tensor, Correction | None] | None:
    """Fuse every block of ``blocks.matrix``; None when some element is not finite.

    Returns:
        The fused matrix (``blocks.matrix`` itself when ``in_place``) and the correction.
    """
    matrix = blocks.matrix
    rows, columns = matrix.shape
    target = torch.empty(rows, columns, dtype=matrix.dtype, device=matrix.device)
    threshold = overflow_threshold(matrix.dtype)
    fits = torch.ones((), dtype=torch.bool, device=matrix.device)
    packed = (
        torch.zeros(math.ceil(rows * columns / 4), dtype=torch.uint8, device=matrix.device)
        if keep_correction
        else None
    )
    for start, stop in blocks.ranges():
        product = blocks.product(start, stop)
        out = target[start:stop]
        merged = computed(out, blocks, partial(blocks.merge, start, stop, product))
        fits &= guard.block_fits_on_device(merged, threshold)
        if packed is not None:
            unfused = blocks.unmerge(
                start, stop, out, product, blocks.spare_cast_block(start, stop)
            )
            codes = packed_codes(matrix[start:stop], unfused)
            packed[start * columns // 4 : start * columns // 4 + codes.numel()] = codes
    correction = None
    if packed is not None:
        pin = matrix.device.type == "cuda"
        correction = assembled(matrix.dtype, packed, matrix, blocks.block_rows * columns, pin)
    if not wait_for(fits):
        return None
    if in_place:
        matrix.copy_(target)
        return matrix, correction
    return target, correction


def unfuse(
    blocks: Blocks, fused: torch.Tensor, correction: Correction | None
) -> torch.Tensor | None:
    """Every block of ``fused`` unfused, into a new tensor; exactly with ``correction``.
    None when an arithmetic unfuse leaves an element that is not finite."""
    rows, columns = fused.shape
    result = torch.empty(rows, columns, dtype=fused.dtype, device=fused.device)
    threshold = overflow_threshold(fused.dtype)
    fits = torch.ones((), dtype=torch.bool, device=fused.device)
    packed = escapes = None
    table = steps_table(fused.device)
    if correction is not None:
        packed = correction.packed_codes.to(fused.device, non_blocking=True)
        escapes = correction.escape_bits.to(fused.device, non_blocking=True)
    for start, stop in blocks.ranges():
        product = blocks.product(start, stop)
        out = result[start:stop]
        unmerge = partial(blocks.unmerge, start, stop, fused[start:stop], product)
        if packed is None:
            fits &= guard.block_fits_on_device(computed(out, blocks, unmerge), threshold)
            continue
        unfused = unmerge(blocks.cast_block(start, stop))
        offset, count = start * columns, out.numel()
        steps = steps_of(packed[offset // 4 : math.ceil((offset + count) / 4)], count, table)
        int_view(out).view(-1).copy_(int_view(unfused).reshape(-1) + steps)
    if packed is not None and escapes is not None and escapes.numel():
        int_view(result).view(-1)[escape_positions(packed)] = escapes
    if not wait_for(fits):
        return None
    return result
