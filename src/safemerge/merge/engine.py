"""The blocked float32 merge loop: fuse and unfuse one weight matrix, row block by row block.

Each block's float32 work (the rank-r product, the sum, the guard, the cast, and the
exact-unfuse correction) stays in cache, so no full-size float32 temporary exists. A fuse
either writes in place, journaled by its own exact correction, or into a new buffer the
caller commits: either way a refusal or any exception leaves the weight as it was.

Unfuse recomputes the same deltas with the same block geometry and thread count, so the
arithmetic is bit-for-bit the same as during the fuse; that is what makes the stored
correction exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from safemerge.merge import guard
from safemerge.merge.correction import Correction, CorrectionBuilder
from safemerge.merge.numerics import int_view, overflow_threshold

#: Bytes of float32 work per row block. A block's few buffers stay in the L2/L3 caches of
#: current CPUs, and the fixed cost of each torch call (a few microseconds) stays small
#: beside its work; 2 MiB measured best on 2-core EPYC (1 MiB L2 a core, 32 MiB L3) for
#: bfloat16 and float32 (see benchmarks/fuse_throughput.py).
BLOCK_BYTES = 2 * 1024 * 1024

#: Dtypes whose cast from float32 turns overflow into +-Inf, so the guard can read the cast
#: result itself; the float8 types are cast from a float32 block checked against their range
#: (float8_e4m3fn saturates instead of overflowing, and torch has no min/max for float8).
_CAST_SHOWS_OVERFLOW = (torch.float32, torch.float16, torch.bfloat16)

#: Elements sampled by :func:`fingerprint`.
FINGERPRINT_SAMPLES = 4096


@dataclass(frozen=True)
class LowRankDelta:
    """``left @ right`` in float32, every adapter's coefficient already folded into ``left``.

    Several adapters are one product of their concatenated factors:
    ``[c1*B1 | c2*B2] @ [A1; A2]``, so one matmul serves them all.
    """

    left: torch.Tensor
    right: torch.Tensor

    @classmethod
    def from_terms(
        cls, terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]], device: torch.device
    ) -> LowRankDelta:
        """Build from ``(left, right, coefficient)`` triples in M's layout."""
        rank = sum(left.shape[1] for left, _, _ in terms)
        rows, columns = terms[0][0].shape[0], terms[0][1].shape[1]
        # New contiguous allocations every time: the same memory alignment at fuse and at
        # unfuse keeps the matmul's rounding identical, which the exact unfuse relies on.
        left_all = torch.empty(rows, rank, dtype=torch.float32, device=device)
        right_all = torch.empty(rank, columns, dtype=torch.float32, device=device)
        start = 0
        for left, right, coefficient in terms:
            stop = start + left.shape[1]
            left_all[:, start:stop].copy_(left.detach()).mul_(coefficient)
            right_all[start:stop].copy_(right.detach())
            start = stop
        return cls(left_all, right_all)


@dataclass(frozen=True)
class OutputFactor:
    """A per-output-channel multiplier (DoRA's ``magnitude / norm``), float64.

    Kept in float64 so that a huge or tiny norm cannot make it overflow or underflow
    where the product with the weight is an ordinary number; the product is computed in
    float64 and rounded once into the block's dtype.
    """

    values: torch.Tensor
    along_rows: bool

    def block(self, start: int, stop: int) -> torch.Tensor:
        if self.along_rows:
            return self.values[start:stop, None]
        return self.values[None, :]


@dataclass(frozen=True)
class FusedMatrix:
    merged: torch.Tensor | None
    correction: Correction | None
    fingerprint: int
    block_rows: int


def block_rows_for(rows: int, columns: int) -> int:
    """Rows per block: a multiple of 4 (so blocks start on whole correction bytes)."""
    fitting = BLOCK_BYTES // max(4 * columns, 1)
    return max(4, fitting // 4 * 4) if fitting < rows else max(rows, 1)


@contextlib.contextmanager
def pinned_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, so matmul results repeat bit for bit."""
    previous = torch.get_num_threads()
    if previous != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def fingerprint(tensor: torch.Tensor) -> int:
    """A cheap checksum of evenly spaced elements' bits, position-weighted.

    Catches what happens to a fused layer between fuse and unfuse in practice (another
    fuse, an optimizer step: changes that touch most elements) at a cost independent of
    the layer's size. It is a sanity check, not a proof that nothing changed.
    """
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    sample = int_view(flat[::stride].contiguous()).to(torch.int64)
    weights = torch.arange(1, sample.numel() + 1, dtype=torch.int64, device=sample.device)
    return int((sample * weights).sum())


class _Blocks:
    """Buffers and per-block arithmetic shared by fuse, unfuse and the DoRA norm pass.

    Every operation reads its dtype inputs and writes its dtype output directly (torch
    computes mixed-dtype elementwise ops in float32 and rounds once on the way out), so a
    block costs one matmul and a handful of passes over cached memory.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        delta: LowRankDelta,
        block_rows: int,
        factor: OutputFactor | None = None,
    ) -> None:
        self.matrix = matrix
        self.delta = delta
        self.block_rows = block_rows
        self.factor = factor
        rows, columns = matrix.shape
        buffer_rows = min(block_rows, rows)
        self._delta = torch.empty(buffer_rows, columns, dtype=torch.float32, device=matrix.device)
        self._float32 = torch.empty_like(self._delta)
        self._cast = torch.empty(buffer_rows, columns, dtype=matrix.dtype, device=matrix.device)
        self._spare_cast = torch.empty_like(self._cast)
        self._upcast = (
            None if matrix.dtype in _CAST_SHOWS_OVERFLOW else torch.empty_like(self._delta)
        )

    def ranges(self) -> Iterator[tuple[int, int]]:
        rows = self.matrix.shape[0]
        for start in range(0, rows, self.block_rows):
            yield start, min(start + self.block_rows, rows)

    def product(self, start: int, stop: int) -> torch.Tensor:
        """The block's ``left @ right`` (coefficients included), float32."""
        product = self._delta[: stop - start]
        torch.mm(self.delta.left[start:stop], self.delta.right, out=product)
        return product

    def merge(
        self, start: int, stop: int, product: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out = (W + product) * factor``, rounded once into ``out``'s dtype."""
        weight = self._readable(self.matrix[start:stop])
        if self.factor is None:
            return torch.add(weight, product, out=out)
        merged = torch.add(weight, product, out=self._float32[: stop - start])
        return torch.mul(merged, self.factor.block(start, stop), out=out)

    def unmerge(
        self, start: int, stop: int, fused: torch.Tensor, product: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out = N / factor - product``: the arithmetic inverse of :meth:`merge`."""
        fused = self._readable(fused)
        if self.factor is None:
            return torch.sub(fused, product, out=out)
        divided = torch.div(
            fused, self.factor.block(start, stop), out=self._float32[: stop - start]
        )
        return torch.sub(divided, product, out=out)

    def _readable(self, block: torch.Tensor) -> torch.Tensor:
        # torch does no mixed-dtype arithmetic with float8: read it into float32 first.
        if self._upcast is None:
            return block
        return self._upcast[: block.shape[0]].copy_(block)

    def float32_block(self, start: int, stop: int) -> torch.Tensor:
        return self._float32[: stop - start]

    def cast_block(self, start: int, stop: int) -> torch.Tensor:
        return self._cast[: stop - start]

    def spare_cast_block(self, start: int, stop: int) -> torch.Tensor:
        return self._spare_cast[: stop - start]

    def all_merged(self) -> Iterator[torch.Tensor]:
        """Every block's float32 merge, for counting what a refusal found."""
        for start, stop in self.ranges():
            product = self.product(start, stop)
            yield self.merge(start, stop, product, self._float32[: stop - start].clone())

    def all_unmerged(self) -> Iterator[torch.Tensor]:
        for start, stop in self.ranges():
            product = self.product(start, stop)
            out = torch.empty_like(self._float32[: stop - start])
            yield self.unmerge(start, stop, self.matrix[start:stop], product, out)


def _guarded_into(
    target: torch.Tensor,
    blocks: _Blocks,
    start: int,
    stop: int,
    compute: Callable[[torch.Tensor], torch.Tensor],
) -> bool:
    """Write ``compute``'s block into ``target``, and whether it fits ``target``'s dtype.

    Dtypes whose cast shows overflow are computed straight into ``target`` and checked
    there (the caller discards ``target`` on False); the float8 types go through the float32
    block, checked against their range before ``target`` is written.
    """
    if target.dtype in _CAST_SHOWS_OVERFLOW:
        compute(target)
        return guard.block_fits(target, overflow_threshold(target.dtype))
    merged = compute(blocks.float32_block(start, stop))
    if not guard.block_fits(merged, overflow_threshold(target.dtype)):
        return False
    target.copy_(merged)
    return True


def fuse_matrix(
    matrix: torch.Tensor,
    delta: LowRankDelta,
    *,
    layer: str,
    weight_shape: Sequence[int],
    factor: OutputFactor | None = None,
    keep_correction: bool = True,
    in_place: bool = False,
) -> FusedMatrix:
    """Merge ``delta`` into ``matrix``, guarded and all-or-nothing.

    ``in_place`` (which needs ``keep_correction``) writes the merge into ``matrix`` itself,
    block by block, each block's exact-unfuse correction recorded before it is overwritten;
    a refusal or any exception midway restores the blocks already written from those
    corrections, so no full-size copy is ever held. Otherwise the merge goes into a new
    tensor, ``FusedMatrix.merged``, for the caller to commit.

    Raises:
        NonFiniteMergeError: some element would not be finite in ``matrix.dtype``; the
            error counts every bad element of the whole matrix, and ``matrix`` is unchanged.
    """
    dtype = matrix.dtype
    rows, columns = matrix.shape
    blocks = _Blocks(matrix, delta, block_rows_for(rows, columns), factor)
    if in_place and not keep_correction:
        raise ValueError("an in-place fuse needs its correction to roll back a failure")
    builder = CorrectionBuilder(rows * columns, dtype) if keep_correction else None
    target = matrix if in_place else torch.empty(rows, columns, dtype=dtype, device=matrix.device)
    written = 0
    try:
        for start, stop in blocks.ranges():
            product = blocks.product(start, stop)
            fused = blocks.cast_block(start, stop) if in_place else target[start:stop]
            if not _guarded_into(
                fused, blocks, start, stop, partial(blocks.merge, start, stop, product)
            ):
                break
            if builder is not None:
                unfused = blocks.unmerge(
                    start, stop, fused, product, blocks.spare_cast_block(start, stop)
                )
                builder.add(start * columns, matrix[start:stop], unfused)
            if in_place:
                target[start:stop].copy_(fused)
            written = stop
    except BaseException:
        if in_place and builder is not None:
            _restore_rows(blocks, builder.build(), written)
        raise
    if written < rows:  # refused
        if in_place and builder is not None:
            _restore_rows(blocks, builder.build(), written)
        raise guard.non_finite_error(
            blocks.all_merged(), layer=layer, tensor="weight", dtype=dtype, shape=weight_shape
        )
    correction = builder.build() if builder is not None else None
    return FusedMatrix(
        None if in_place else target, correction, fingerprint(target), blocks.block_rows
    )


def _restore_rows(blocks: _Blocks, correction: Correction, rows: int) -> None:
    """Undo an in-place fuse of ``matrix[:rows]`` exactly (rollback after a failure)."""
    columns = blocks.matrix.shape[1]
    for start, stop in blocks.ranges():
        if start >= rows:
            return
        product = blocks.product(start, stop)
        fused = blocks.matrix[start:stop]
        unfused = blocks.unmerge(start, stop, fused, product, blocks.cast_block(start, stop))
        fused.copy_(correction.apply(start * columns, unfused))


def unfuse_matrix(
    fused: torch.Tensor,
    delta: LowRankDelta,
    *,
    layer: str,
    weight_shape: Sequence[int],
    block_rows: int,
    factor: OutputFactor | None = None,
    correction: Correction | None = None,
    in_place: bool = False,
) -> torch.Tensor | None:
    """Undo :func:`fuse_matrix`: exactly with ``correction``, arithmetically without.

    ``block_rows`` must be the fuse's, so that every block's arithmetic repeats exactly.
    ``in_place`` (exact unfuse only) restores ``fused`` itself and returns None; an
    exception midway fuses the restored blocks again, which gives back their fused bits
    exactly (the fuse is a deterministic function of the original). Otherwise the result
    is a new tensor.

    Raises:
        NonFiniteMergeError: an arithmetic unfuse would leave a non-finite element.
    """
    if in_place and correction is None:
        raise ValueError(
            "an in-place unfuse needs the correction (only an exact unfuse can roll back)"
        )
    dtype = fused.dtype
    rows, columns = fused.shape
    blocks = _Blocks(fused, delta, block_rows, factor)
    result = fused if in_place else torch.empty(rows, columns, dtype=dtype, device=fused.device)
    restored_rows = 0
    try:
        for start, stop in blocks.ranges():
            product = blocks.product(start, stop)
            target = result[start:stop]
            if correction is not None:
                unfused = blocks.unmerge(
                    start, stop, fused[start:stop], product, blocks.cast_block(start, stop)
                )
                target.copy_(correction.apply(start * columns, unfused))
                restored_rows = stop
                continue
            compute = partial(blocks.unmerge, start, stop, fused[start:stop], product)
            if not _guarded_into(target, blocks, start, stop, compute):
                raise guard.non_finite_error(
                    blocks.all_unmerged(),
                    layer=layer,
                    tensor="weight",
                    dtype=dtype,
                    shape=weight_shape,
                )
    except BaseException:
        if in_place:
            _refuse_restored_rows(blocks, restored_rows)
        raise
    return None if in_place else result


def _refuse_restored_rows(blocks: _Blocks, rows: int) -> None:
    """Fuse ``matrix[:rows]`` again after an in-place unfuse failed midway (exact: the
    same arithmetic as the original fuse, from the same original values)."""
    for start, stop in blocks.ranges():
        if start >= rows:
            return
        product = blocks.product(start, stop)
        fused = blocks.cast_block(start, stop)
        # These blocks passed the guard when they were first fused: the check repeats it.
        _guarded_into(fused, blocks, start, stop, partial(blocks.merge, start, stop, product))
        blocks.matrix[start:stop].copy_(fused)


def output_norms(matrix: torch.Tensor, delta: LowRankDelta, *, along_rows: bool) -> torch.Tensor:
    """L2 norm of each output channel of ``W + delta`` (DoRA's weight norm), in float64."""
    rows, columns = matrix.shape
    blocks = _Blocks(matrix, delta, block_rows_for(rows, columns))
    squares = torch.zeros(
        rows if along_rows else columns, dtype=torch.float64, device=matrix.device
    )
    for start, stop in blocks.ranges():
        product = blocks.product(start, stop)
        merged = blocks.merge(start, stop, product, blocks.float32_block(start, stop)).to(
            torch.float64
        )
        if along_rows:
            squares[start:stop] = merged.square().sum(dim=1)
        else:
            squares += merged.square().sum(dim=0)
    return squares.sqrt()
