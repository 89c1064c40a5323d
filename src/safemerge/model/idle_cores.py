"""How many threads a streaming fuse computes on: the cores other processes leave idle now.

Counted from Linux's ``/proc`` (runnable tasks, this process's own left out), decided
again every few seconds; elsewhere torch's own count.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from safemerge.merge import engine

#: How often, in seconds, a streaming fuse reconsiders how many threads it computes on.
THREADS_EVERY = 2.0


class FuseThreads:
    """The threads a streaming fuse computes its blocks on: at most the cores that other
    processes leave idle, decided again every :data:`THREADS_EVERY` seconds; torch runs
    every op on one thread meanwhile (:func:`safemerge.merge.engine.blocks_on`), and its
    count from before is restored afterwards.

    When each torch call of a layer's fuse and check forked and joined two threads, and
    the other thread's core was taken by another process, every join waited for the
    scheduler. Measured on a 2-core machine with a busy process on one core, 4
    TinyLlama layers: the fuse phase 33-39 s with 2 threads, 5-6 s with 1 (the whole
    fuse 66-71 s against 34-40 s). Since the engine and the check share out blocks to
    threads that each run single-threaded torch calls, the count matters little under
    load (4.7-6.0 s against 4.8-5.1 s, same machine and load). The small torch calls of
    each layer's set-up run on one thread even when both cores are free: this process's
    own reading and writing threads take them too, and each join waited for those (about
    1.5 s of a 2.2 GB model's 12 s, before). This is the policy of
    :func:`safemerge.peft.threads.merge_threads`, but counted now rather than from the
    1-minute load average: a fresh ``safemerge fuse`` process has no history there, and
    a busy process started a few seconds before barely shows in it.
    """

    def __init__(self) -> None:
        self._limit = torch.get_num_threads()
        self._decided = -float("inf")
        self._count: int | None = None
        self._scope = contextlib.ExitStack()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._decided < THREADS_EVERY:
            return
        self._decided = now
        count = fuse_threads(self._limit)
        if count != self._count:
            self._scope.close()
            self._scope.enter_context(engine.blocks_on(count))
            self._count = count

    def __enter__(self) -> FuseThreads:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._scope.close()


def fuse_threads(limit: int) -> int:
    """How many threads to compute on: the usable cores less those other processes'
    runnable tasks take now, between 1 and ``limit``; ``limit`` where that is unknown."""
    busy = busy_elsewhere()
    if busy is None:
        return limit
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores - busy))


def busy_elsewhere(samples: int = 5, pause: float = 0.001) -> int | None:
    """Runnable tasks of other processes, the least seen over a few samples ``pause``
    seconds apart (a task busy computing is runnable in every one; a passing one is
    not), from Linux's ``/proc``; None elsewhere.

    The kernel's count (``/proc/loadavg``) includes this process's runnable threads,
    the one reading it first: they are counted in ``/proc/self/task`` and left out.
    """
    seen = []
    for sample in range(samples):
        if sample:
            time.sleep(pause)
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            own = sum(_running(task) for task in Path("/proc/self/task").iterdir())
        except (OSError, ValueError, IndexError):
            return None
        seen.append(running - max(own, 1))
    return max(0, min(seen))


def _running(task: Path) -> bool:
    try:
        stat = (task / "stat").read_text()
    except OSError:  # the thread ended meanwhile
        return False
    # "pid (name) state ...": the name may hold spaces and parentheses; the state follows
    # the last parenthesis.
    return stat[stat.rindex(")") + 2 :].startswith("R")
