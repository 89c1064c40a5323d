"""The blocked float32 merge loop: fuse and unfuse one weight matrix, row block by row block.

Each block's float32 work (the rank-r product, the sum, the guard, the cast, and the
exact-unfuse correction) stays in cache, so no full-size float32 temporary exists. A fuse
either writes in place, journaled by its own exact correction, or into a new buffer the
caller commits: either way a refusal or any exception leaves the weight as it was.

Unfuse recomputes the same deltas with the same block geometry, so the arithmetic is
bit-for-bit the same as during the fuse; that is what makes the stored correction exact.
Blocks run on several threads (:func:`run_blocks`); on a GPU the fuse and unfuse go
through :mod:`safemerge.merge.on_device`, which waits for the device once a layer.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

import torch

from safemerge.merge import guard, on_device
from safemerge.merge.blocks import Blocks, LowRankDelta, OutputFactor

__all__ = [
    "BLOCK_BYTES",
    "FusedMatrix",
    "LowRankDelta",
    "OutputFactor",
    "block_rows_for",
    "block_threads",
    "blocks_on",
    "fingerprint",
    "fuse_matrix",
    "on_threads",
    "output_norms",
    "pinned_threads",
    "run_blocks",
    "unfuse_matrix",
    "waited_out",
]
from safemerge.merge.correction import Correction, CorrectionBuilder
from safemerge.merge.numerics import int_view

#: Bytes of float32 work per row block. A block's few buffers stay in the L2/L3 caches of
#: current CPUs, and the fixed cost of each torch call (a few microseconds) stays small
#: beside its work; 2 MiB measured best on 2-core EPYC (1 MiB L2 a core, 32 MiB L3) for
#: bfloat16 and float32 (see benchmarks/fuse_throughput.py).
BLOCK_BYTES = 2 * 1024 * 1024

#: Elements sampled by :func:`fingerprint`.
FINGERPRINT_SAMPLES = 4096


@dataclass(frozen=True)
class FusedMatrix:
    merged: torch.Tensor | None
    correction: Correction | None
    fingerprint: int
    block_rows: int


def block_rows_for(rows: int, columns: int, device: torch.device | None = None) -> int:
    """Rows per block: a multiple of 4 (so blocks start on whole correction bytes), as many
    as :data:`BLOCK_BYTES` of float32 work hold (on a GPU,
    :data:`safemerge.merge.on_device.DEVICE_BLOCK_BYTES`)."""
    budget = BLOCK_BYTES
    if device is not None and device.type != "cpu":
        budget = on_device.DEVICE_BLOCK_BYTES
    fitting = budget // max(4 * columns, 1)
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


#: Threads :func:`blocks_on` shares blocks out to; None: torch's intra-op count.
_block_threads: int | None = None


def block_threads() -> int:
    """How many threads a layer's blocks (and its bound check's) are shared out to: the
    count :func:`blocks_on` set, else torch's intra-op thread count."""
    return torch.get_num_threads() if _block_threads is None else _block_threads


@contextlib.contextmanager
def blocks_on(count: int) -> Iterator[None]:
    """Share blocks out to ``count`` threads while torch runs every op on one.

    For a caller that fuses many layers with other work beside it (a streaming fuse
    reading and writing on threads of its own): each small torch op of a layer's set-up
    (its factors, its check's terms) would otherwise fork and join torch's threads, and
    with a core taken, every join waits for the scheduler. The blocks are where the work
    is, and they take threads of their own (:func:`run_blocks`).
    """
    global _block_threads
    previous = _block_threads
    _block_threads = max(1, count)
    try:
        with pinned_threads(1):
            yield
    finally:
        _block_threads = previous


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


def fuse_matrix(
    matrix: torch.Tensor,
    delta: LowRankDelta,
    *,
    layer: str,
    weight_shape: Sequence[int],
    factor: OutputFactor | None = None,
    keep_correction: bool = True,
    in_place: bool = False,
    out: torch.Tensor | None = None,
) -> FusedMatrix:
    """Merge ``delta`` into ``matrix``, guarded and all-or-nothing.

    ``in_place`` writes the merge into ``matrix`` itself, block by block, each block's
    exact-unfuse correction recorded before it is overwritten; a refusal or any exception
    midway restores the blocks already written from those corrections, so no full-size
    copy is ever held. Without ``keep_correction`` that correction is the fuse's journal
    only, dropped once every block is written: a quarter byte an element for the layer's
    duration, where a new tensor would be the weight's whole size (and first-touch page
    faults on every page of it). Otherwise the merge goes into a new tensor, or into
    ``out`` (rows x columns, ``matrix``'s dtype, on the CPU), returned as
    ``FusedMatrix.merged`` for the caller to commit.

    Blocks run on as many threads as torch's intra-op setting allows (see
    :func:`run_blocks`); the result does not depend on how many.

    Raises:
        NonFiniteMergeError: some element would not be finite in ``matrix.dtype``; the
            error counts every bad element of the whole matrix, and ``matrix`` is unchanged.
    """
    dtype = matrix.dtype
    rows, columns = matrix.shape
    block_rows = block_rows_for(rows, columns, matrix.device)
    if on_device.applies(matrix.device):
        blocks = Blocks(matrix, delta, block_rows, factor)
        done = on_device.fuse(blocks, keep_correction=keep_correction, in_place=in_place)
        if done is None:
            raise guard.non_finite_error(
                blocks.all_merged(), layer=layer, tensor="weight", dtype=dtype, shape=weight_shape
            )
        fused, correction = done
        return FusedMatrix(None if in_place else fused, correction, fingerprint(fused), block_rows)
    # In place, the correction is also the journal that rolls a failure back.
    builder = CorrectionBuilder(rows * columns, dtype) if keep_correction or in_place else None
    if in_place:
        target = matrix
    elif out is not None:
        assert out.shape == matrix.shape and out.dtype == dtype and out.device == matrix.device
        target = out
    else:
        target = torch.empty(rows, columns, dtype=dtype, device=matrix.device)

    def fuse_block(blocks: Blocks, start: int, stop: int) -> bool:
        fused = blocks.cast_block(start, stop) if in_place else target[start:stop]
        if not blocks.fuse_into(start, stop, fused, builder):
            return False
        if in_place:
            target[start:stop].copy_(fused)
        return True

    def new_blocks() -> Blocks:
        return Blocks(matrix, delta, block_rows, factor)

    def restore(written: Sequence[tuple[int, int]]) -> None:
        if in_place and builder is not None:
            _restore_blocks(new_blocks(), builder.build(), written)

    written, complete = run_blocks(
        rows, block_rows, new_blocks, fuse_block, device=matrix.device, undo=restore
    )
    if not complete:  # refused
        restore(written)
        raise guard.non_finite_error(
            new_blocks().all_merged(), layer=layer, tensor="weight", dtype=dtype, shape=weight_shape
        )
    correction = builder.build() if builder is not None and keep_correction else None
    return FusedMatrix(None if in_place else target, correction, fingerprint(target), block_rows)


def run_blocks(
    rows: int,
    block_rows: int,
    new_blocks: Callable[[], Blocks],
    step: Callable[[Blocks, int, int], bool],
    *,
    device: torch.device,
    undo: Callable[[Sequence[tuple[int, int]]], None],
) -> tuple[list[tuple[int, int]], bool]:
    """Run ``step(blocks, start, stop)`` over every row block, on several threads.

    Each thread has its own :class:`Blocks` buffers and takes the next block when it is
    done with one, so a core another process keeps busy slows only the blocks it gets
    (a parallel region per block would wait for its slowest thread every time). torch
    runs one thread per op meanwhile: every block's matmul, on whichever thread, is then
    the same single-threaded computation, so fuse and unfuse repeat it bit for bit.

    Returns:
        The blocks done, in no particular order, and whether every block was (a step
        returning False stops the run; blocks under way still finish). An exception from
        a step (or an interrupt) is re-raised once every thread stopped and ``undo`` was
        called with the blocks done.
    """
    ranges = [(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]
    # Threads pay off on the CPU only: elsewhere one thread queues the device's work.
    threads = min(block_threads(), len(ranges)) if device.type == "cpu" else 1
    done: list[tuple[int, int]] = []
    lock = threading.Lock()
    pending = iter(ranges)
    state: dict[str, BaseException | bool] = {"refused": False}

    def work() -> None:
        blocks = new_blocks()
        while True:
            with lock:
                if state["refused"] or "error" in state:
                    return
                block = next(pending, None)
            if block is None:
                return
            try:
                finished = step(blocks, *block)
            except BaseException as error:  # every thread stops; the caller rolls back
                with lock:
                    state.setdefault("error", error)
                return
            with lock:
                if finished:
                    done.append(block)
                else:
                    state["refused"] = True

    with pinned_threads(1 if threads > 1 else torch.get_num_threads()):
        try:
            on_threads(work, threads)
        except BaseException as error:  # an interrupt between blocks, or while waiting
            with lock:
                state.setdefault("error", error)
    failure = state.get("error")
    if isinstance(failure, BaseException):
        undo(done)
        raise failure
    return done, not state["refused"] and len(done) == len(ranges)


#: Helper threads kept from one :func:`on_threads` call to the next, and how many.
_helpers: tuple[ThreadPoolExecutor, int] | None = None
_helpers_lock = threading.Lock()


def on_threads(work: Callable[[], None], count: int) -> None:
    """Run ``work`` on the calling thread and on ``count - 1`` helper threads; return once
    every one returned, raising the first exception any raised (the caller's first).

    The helpers are kept between calls: a new thread's start waits until the scheduler
    runs it, about 2 ms on a busy 2-core machine, and a streaming fuse started a few for
    each of hundreds of layers. An interrupt while the caller waits for the helpers is
    held until they are done (they share the caller's data) and raised then.
    """
    global _helpers
    if count <= 1:
        work()
        return
    futures: list[Future[None]] = []
    failure: BaseException | None = None
    try:  # an interrupt even while submitting waits for the helpers already started
        with _helpers_lock:
            if _helpers is None or _helpers[1] < count - 1:
                if _helpers is not None:
                    _helpers[0].shutdown(wait=False)  # its threads end once idle
                size = max(count - 1, os.cpu_count() or 1)
                _helpers = (ThreadPoolExecutor(size, thread_name_prefix="safemerge-blocks"), size)
            for _ in range(count - 1):
                futures.append(_helpers[0].submit(work))
        work()
    except BaseException as error:
        failure = error
    interrupt = waited_out(futures)  # always: the helpers may still be at work
    failure = failure or interrupt
    for future in futures:
        failure = failure or future.exception()
    if failure is not None:
        raise failure


def waited_out(futures: Sequence[Future[Any]]) -> KeyboardInterrupt | None:
    """Wait until every one of ``futures`` is done, whatever happens: threads that share
    the caller's data (blocks, a file) must not be left running. A Ctrl-C meanwhile is
    held and returned (the caller raises it once it is safe to), else None."""
    interrupt: KeyboardInterrupt | None = None
    while True:
        try:
            futures_wait(futures)
            return interrupt
        except KeyboardInterrupt as received:
            interrupt = interrupt or received


def _restore_blocks(
    blocks: Blocks, correction: Correction, written: Sequence[tuple[int, int]]
) -> None:
    """Undo an in-place fuse of the ``written`` blocks exactly (rollback after a failure)."""
    for start, stop in written:
        fused = blocks.matrix[start:stop]
        blocks.restore_into(start, stop, fused, correction, fused)


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
    if on_device.applies(fused.device):
        blocks = Blocks(fused, delta, block_rows, factor)
        restored = on_device.unfuse(blocks, fused, correction)
        if restored is None:
            raise guard.non_finite_error(
                blocks.all_unmerged(), layer=layer, tensor="weight", dtype=dtype, shape=weight_shape
            )
        if not in_place:
            return restored
        fused.copy_(restored)
        return None
    result = fused if in_place else torch.empty(rows, columns, dtype=dtype, device=fused.device)

    def unfuse_block(blocks: Blocks, start: int, stop: int) -> bool:
        if correction is not None:
            blocks.restore_into(start, stop, fused[start:stop], correction, result[start:stop])
            return True
        return blocks.unfuse_into(start, stop, fused[start:stop], result[start:stop])

    def new_blocks() -> Blocks:
        return Blocks(fused, delta, block_rows, factor)

    def refuse(restored: Sequence[tuple[int, int]]) -> None:
        if in_place:
            _refuse_blocks(new_blocks(), restored)

    _, complete = run_blocks(
        rows, block_rows, new_blocks, unfuse_block, device=fused.device, undo=refuse
    )
    if not complete:
        raise guard.non_finite_error(
            new_blocks().all_unmerged(),
            layer=layer,
            tensor="weight",
            dtype=dtype,
            shape=weight_shape,
        )
    return None if in_place else result


def _refuse_blocks(blocks: Blocks, restored: Sequence[tuple[int, int]]) -> None:
    """Fuse the ``restored`` blocks again after an in-place unfuse failed midway (exact:
    the same arithmetic as the original fuse, from the same original values)."""
    for start, stop in restored:
        fused = blocks.cast_block(start, stop)
        # These blocks passed the guard when they were first fused: the check repeats it.
        blocks.fuse_into(start, stop, fused, None)
        blocks.matrix[start:stop].copy_(fused)


def output_norms(matrix: torch.Tensor, delta: LowRankDelta, *, along_rows: bool) -> torch.Tensor:
    """L2 norm of each output channel of ``W + delta`` (DoRA's weight norm), in float64."""
    rows, columns = matrix.shape
    blocks = Blocks(matrix, delta, block_rows_for(rows, columns))
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
