"""The blocked float32 merge loop: fuse and unfuse one weight matrix, row block by row block.

Each block's float32 work (``W + left @ right``, the guard, the cast, and the
exact-unfuse correction) stays in cache, so no full-size float32 temporary exists. The
result goes into a new buffer of the weight's dtype; the caller commits it only when the
whole matrix passed the guard, so a refusal or any exception leaves the weight untouched.

Unfuse recomputes the same deltas with the same block geometry and thread count, so the
arithmetic is bit-for-bit the same as during the fuse; that is what makes the stored
ulp correction exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from safemerge import guard
from safemerge.correction import Correction, CorrectionBuilder
from safemerge.numerics import int_view, overflow_threshold

#: Bytes of float32 work per row block: small enough to stay in L2 on current CPUs,
#: large enough that per-block Python overhead is a few percent.
BLOCK_BYTES = 512 * 1024


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
    """A per-output-channel multiplier (DoRA's ``magnitude / norm``), float32."""

    values: torch.Tensor
    along_rows: bool

    def block(self, start: int, stop: int) -> torch.Tensor:
        if self.along_rows:
            return self.values[start:stop, None]
        return self.values[None, :]


@dataclass(frozen=True)
class FusedMatrix:
    merged: torch.Tensor
    correction: Correction | None
    fingerprint: int


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


#: Elements sampled by :func:`fingerprint`.
FINGERPRINT_SAMPLES = 4096


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
    """Buffers and per-block arithmetic shared by fuse, unfuse and the DoRA norm pass."""

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
        self._work = torch.empty(buffer_rows, columns, dtype=torch.float32, device=matrix.device)

    def ranges(self) -> Iterator[tuple[int, int]]:
        rows = self.matrix.shape[0]
        for start in range(0, rows, self.block_rows):
            yield start, min(start + self.block_rows, rows)

    def merged(self, start: int, stop: int) -> torch.Tensor:
        """``(float32(W) + left @ right) * factor`` for the block (one BLAS call for the sum)."""
        merged = self._work[: stop - start]
        merged.copy_(self.matrix[start:stop])
        merged.addmm_(self.delta.left[start:stop], self.delta.right)
        if self.factor is not None:
            merged.mul_(self.factor.block(start, stop))
        return merged

    def unmerged(self, start: int, stop: int, fused: torch.Tensor) -> torch.Tensor:
        """``float32(N) / factor - left @ right``: the arithmetic inverse of :meth:`merged`."""
        unmerged = self._work[: stop - start]
        unmerged.copy_(fused)
        if self.factor is not None:
            unmerged.div_(self.factor.block(start, stop))
        unmerged.addmm_(self.delta.left[start:stop], self.delta.right, alpha=-1)
        return unmerged

    def all_merged(self) -> Iterator[torch.Tensor]:
        for start, stop in self.ranges():
            yield self.merged(start, stop)

    def all_unmerged(self) -> Iterator[torch.Tensor]:
        for start, stop in self.ranges():
            yield self.unmerged(start, stop, self.matrix[start:stop])


def fuse_matrix(
    matrix: torch.Tensor,
    delta: LowRankDelta,
    *,
    layer: str,
    weight_shape: Sequence[int],
    factor: OutputFactor | None = None,
    keep_correction: bool = True,
) -> FusedMatrix:
    """Merge ``matrix`` with ``delta`` into a new tensor of ``matrix.dtype``, guarded.

    Raises:
        NonFiniteMergeError: some element would not be finite in ``matrix.dtype``; the
            error counts every bad element of the whole matrix.
    """
    dtype = matrix.dtype
    rows, columns = matrix.shape
    threshold = overflow_threshold(dtype)
    blocks = _Blocks(matrix, delta, block_rows_for(rows, columns), factor)
    result = torch.empty(rows, columns, dtype=dtype, device=matrix.device)
    builder = CorrectionBuilder(rows * columns, dtype) if keep_correction else None
    unfused = torch.empty(blocks.block_rows, columns, dtype=dtype, device=matrix.device)
    for start, stop in blocks.ranges():
        merged = blocks.merged(start, stop)
        if not guard.block_fits(merged, threshold):
            raise guard.refusal(
                blocks.all_merged(), layer=layer, tensor="weight", dtype=dtype, shape=weight_shape
            )
        fused = result[start:stop]
        fused.copy_(merged)
        if builder is not None:
            restored = unfused[: stop - start]
            restored.copy_(blocks.unmerged(start, stop, fused))
            builder.add(start * columns, matrix[start:stop], restored)
    correction = builder.build() if builder is not None else None
    return FusedMatrix(result, correction, fingerprint(result))


def unfuse_matrix(
    fused: torch.Tensor,
    delta: LowRankDelta,
    *,
    layer: str,
    weight_shape: Sequence[int],
    factor: OutputFactor | None = None,
    correction: Correction | None = None,
) -> torch.Tensor:
    """Undo :func:`fuse_matrix`: exactly with ``correction``, arithmetically without.

    Raises:
        NonFiniteMergeError: an arithmetic unfuse would leave a non-finite element.
    """
    dtype = fused.dtype
    rows, columns = fused.shape
    threshold = overflow_threshold(dtype)
    blocks = _Blocks(fused, delta, block_rows_for(rows, columns), factor)
    result = torch.empty(rows, columns, dtype=dtype, device=fused.device)
    for start, stop in blocks.ranges():
        unmerged = blocks.unmerged(start, stop, fused[start:stop])
        if correction is None and not guard.block_fits(unmerged, threshold):
            raise guard.refusal(
                blocks.all_unmerged(),
                layer=layer,
                tensor="weight",
                dtype=dtype,
                shape=weight_shape,
            )
        target = result[start:stop]
        target.copy_(unmerged)
        if correction is not None:
            target.copy_(correction.apply(start * columns, target))
    return result


def output_norms(matrix: torch.Tensor, delta: LowRankDelta, *, along_rows: bool) -> torch.Tensor:
    """L2 norm of each output channel of ``W + delta`` (DoRA's weight norm), in float64."""
    rows, columns = matrix.shape
    blocks = _Blocks(matrix, delta, block_rows_for(rows, columns))
    squares = torch.zeros(rows if along_rows else columns, dtype=torch.float64, device=matrix.device)
    for start, stop in blocks.ranges():
        merged = blocks.merged(start, stop).to(torch.float64)
        if along_rows:
            squares[start:stop] = merged.square().sum(dim=1)
        else:
            squares += merged.square().sum(dim=0)
    return squares.sqrt()
