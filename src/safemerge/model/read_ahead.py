"""Reading a checkpoint's tensors for a streaming fuse, the next one ahead on a thread."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from safemerge.io.checkpoint import Checkpoint

#: The largest tensor :class:`ReadAhead` reads ahead: memory grows by at most this much.
_READ_AHEAD_LIMIT = 64 * 2**20


class ReadAhead:
    """Reads the next tensor of the plan on a helper thread while the caller fuses and
    checks the one before.

    A read is a copy from the page cache (or the disk) that releases the GIL, so it runs
    beside the fuse instead of before it. One tensor ahead at most, and none larger than
    :data:`_READ_AHEAD_LIMIT` (an embedding is read when asked for), so memory grows by
    one layer's weight. A read's error is raised when its tensor is asked for, as if it
    had been read then.
    """

    def __init__(
        self, checkpoint: Checkpoint, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]]
    ):
        self._checkpoint = checkpoint
        self._order = [(name, dtype) for name, _, dtype in plan]
        self._next = 0  # the first entry of _order not asked for yet, or after it
        self._asked: set[str] = set()
        self._pending: tuple[str, torch.dtype, Future[torch.Tensor]] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="safemerge-read")

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` as :func:`read_tensor` reads it; then the next one is started."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (name, dtype):
            tensor = pending[2].result()
        else:  # not the one read ahead (a LoRA bias read with its weight): read it now
            if pending is not None:
                pending[2].cancel()
            tensor = read_tensor(self._checkpoint, name, dtype)
        self._asked.add(name)
        self._start_next()
        return tensor

    def _start_next(self) -> None:
        while self._next < len(self._order) and self._order[self._next][0] in self._asked:
            self._next += 1
        if self._next == len(self._order):
            return
        name, dtype = self._order[self._next]
        if self._checkpoint.info(name).nbytes <= _READ_AHEAD_LIMIT:
            future = self._executor.submit(read_tensor, self._checkpoint, name, dtype)
            self._pending = (name, dtype, future)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Waits for a read in flight: the checkpoint is closed after this.
        self._executor.shutdown(cancel_futures=True)


def read_tensor(checkpoint: Checkpoint, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor ``name`` of ``checkpoint`` in memory of its own, cast to ``dtype``."""
    # Not through a memory map: its pages would stay resident, growing memory to the model.
    tensor = checkpoint.read(name, mapped=False)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
