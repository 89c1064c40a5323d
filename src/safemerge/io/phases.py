"""Where a streaming fuse spends its time: seconds per phase, summed from clock readings.

A disk-to-disk fuse reads each tensor, fuses it, checks it against its bound, writes it,
and at the end waits for the data to reach the disk. :class:`PhaseTimes` adds up the
wall time the calling thread spends in each of these, two ``perf_counter`` readings per
step (a few hundred per model: nothing next to the work). Work a helper thread does while
the caller goes on is not counted: only the time the caller waits for it is, so the
phases never add up to more than the wall time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The phases, in the order they happen to a tensor.
PHASES = ("read", "fuse", "check", "write", "fsync")


class PhaseTimes:
    """Seconds spent per phase (:data:`PHASES`), accumulated with :meth:`timing`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Add the time the ``with`` block takes (even if it raises) to ``phase``."""
        if phase not in self.seconds:
            raise KeyError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started
