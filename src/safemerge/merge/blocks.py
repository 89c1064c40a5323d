"""A weight matrix's row blocks and the arithmetic done on each, with torch ops or the kernel.

:class:`Blocks` holds one thread's buffers for a matrix and computes a block's rank-r
product, its merge and unmerge (rounded once into the target dtype), and the whole fuse,
restore or unfuse of a block, through the compiled kernel where it applies
(:mod:`safemerge.merge.kernel`) and through torch ops otherwise, to the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from safemerge.merge import guard, kernel
from safemerge.merge.correction import Correction, CorrectionBuilder
from safemerge.merge.numerics import int_view, overflow_threshold

#: Dtypes whose cast from float32 turns overflow into +-Inf, so the guard can read the cast
#: result itself; the float8 types are cast from a float32 block checked against their range
#: (float8_e4m3fn saturates instead of overflowing, and torch has no min/max for float8).
_CAST_SHOWS_OVERFLOW = (torch.float32, torch.float16, torch.bfloat16)


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


class Blocks:
    """Buffers and per-block arithmetic shared by fuse, unfuse and the DoRA norm pass.

    Every torch operation reads its dtype inputs and writes its dtype output directly
    (torch computes mixed-dtype elementwise ops in float32 and rounds once on the way out),
    so a block costs its product and a handful of passes over cached memory; where the
    compiled kernel applies (:attr:`compiled`), :meth:`fuse_into`, :meth:`restore_into`
    and :meth:`unfuse_into` are one pass of it instead, to the same bits.
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
        self._float32_shape = (buffer_rows, columns)
        self.sequential = kernel.sequential_product(matrix, factor is not None)
        self.compiled = kernel.applies(matrix, factor is not None)

    # Buffers, made when first used: the compiled path needs only the cast block and the
    # kernel's scratch, and a layer's fuse makes a set per thread.

    @functools.cached_property
    def _delta(self) -> torch.Tensor:
        return self._new(torch.float32)

    @functools.cached_property
    def _float32(self) -> torch.Tensor:
        return self._new(torch.float32)

    @functools.cached_property
    def _cast(self) -> torch.Tensor:
        return self._new(self.matrix.dtype)

    @functools.cached_property
    def _spare_cast(self) -> torch.Tensor:
        return self._new(self.matrix.dtype)

    @functools.cached_property
    def _upcast(self) -> torch.Tensor | None:
        return None if self.matrix.dtype in _CAST_SHOWS_OVERFLOW else self._new(torch.float32)

    @functools.cached_property
    def _term(self) -> torch.Tensor:
        return self._new(torch.float32)

    @functools.cached_property
    def _codes(self) -> torch.Tensor:
        """The kernel's scratch: a code per element."""
        return self._new(torch.uint8).view(-1)

    @functools.cached_property
    def _escapes(self) -> torch.Tensor:
        """The kernel's scratch: room for every element to escape."""
        return int_view(self._new(self.matrix.dtype)).view(-1)

    def _new(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(self._float32_shape, dtype=dtype, device=self.matrix.device)

    def ranges(self) -> Iterator[tuple[int, int]]:
        rows = self.matrix.shape[0]
        for start in range(0, rows, self.block_rows):
            yield start, min(start + self.block_rows, rows)

    def product(self, start: int, stop: int) -> torch.Tensor:
        """The block's ``left @ right`` (coefficients included), float32: in the compiled
        kernel's order where it applies (see :func:`kernel.sequential_product`), else by
        torch's matmul."""
        product = self._delta[: stop - start]
        left = self.delta.left[start:stop]
        if not self.sequential:
            return torch.mm(left, self.delta.right, out=product)
        term = self._term
        return kernel.rank_product(left, self.delta.right, product, term[: stop - start])

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

    def fuse_into(
        self, start: int, stop: int, out: torch.Tensor, builder: CorrectionBuilder | None
    ) -> bool:
        """Fuse the block into ``out`` (recording its correction in ``builder``), and
        whether every element is finite; on False ``out`` holds garbage."""
        original = self.matrix[start:stop]
        if self.compiled:
            count = out.numel()
            offset = start * self.matrix.shape[1]
            kept = kernel.fuse_block(
                original,
                self.delta.left[start:stop],
                self.delta.right,
                out,
                codes=None if builder is None else self._codes,
                packed=None if builder is None else builder.packed_codes(offset, count),
                escapes=self._escapes,
            )
            if kept is not None and builder is not None:
                builder.record(offset, self._escapes[:kept].clone())
            return kept is not None
        product = self.product(start, stop)
        if not guarded_into(out, self, partial(self.merge, start, stop, product)):
            return False
        if builder is not None:
            unfused = self.unmerge(start, stop, out, product, self.spare_cast_block(start, stop))
            builder.add(start * self.matrix.shape[1], original, unfused)
        return True

    def restore_into(
        self, start: int, stop: int, fused: torch.Tensor, correction: Correction, out: torch.Tensor
    ) -> None:
        """The exact original block from its ``fused`` values (``out`` may be ``fused``)."""
        offset = start * self.matrix.shape[1]
        left, right = self.delta.left[start:stop], self.delta.right
        if self.compiled:
            packed, escapes = correction.block(offset, fused.numel())
            kernel.unfuse_block(
                fused, left, right, out, codes=self._codes, packed=packed, escapes=escapes
            )
            return
        product = self.product(start, stop)
        unfused = self.unmerge(start, stop, fused, product, self.cast_block(start, stop))
        out.copy_(correction.apply(offset, unfused))

    def unfuse_into(self, start: int, stop: int, fused: torch.Tensor, out: torch.Tensor) -> bool:
        """The arithmetic unfuse of the block into ``out``, and whether it is finite."""
        if self.compiled:
            left, right = self.delta.left[start:stop], self.delta.right
            return kernel.unfuse_block(fused, left, right, out) is not None
        product = self.product(start, stop)
        compute = partial(self.unmerge, start, stop, fused, product)
        return guarded_into(out, self, compute)

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


def guarded_into(
    target: torch.Tensor, blocks: Blocks, compute: Callable[[torch.Tensor], torch.Tensor]
) -> bool:
    """Write ``compute``'s block into ``target``, and whether it fits ``target``'s dtype
    (the caller discards ``target`` on False)."""
    return guard.block_fits(computed(target, blocks, compute), overflow_threshold(target.dtype))


def computed(
    target: torch.Tensor, blocks: Blocks, compute: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Write ``compute``'s block into ``target``; returns the block whose range decides
    whether it fits (:func:`guarded_into` reads that at once, a GPU fuse once a layer).

    Dtypes whose cast shows overflow are computed straight into ``target``, which is then
    the block to check; the float8 types go through the float32 block, the one to check
    (their cast saturates, or torch has no min/max for them), then cast into ``target``.
    """
    if target.dtype in _CAST_SHOWS_OVERFLOW:
        return compute(target)
    merged = compute(blocks.float32_block(0, target.shape[0]))
    target.copy_(merged)
    return merged
