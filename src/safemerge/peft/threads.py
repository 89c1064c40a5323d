"""How many threads a PEFT or diffusers merge shares its blocks out to: torch's own count,
cut to the cores that other processes leave idle (torch itself runs each op on one thread
meanwhile: :func:`safemerge.merge.engine.blocks_on`).

The engine merges a weight in cache-sized row blocks, some twenty torch calls per block,
so a model's merge is thousands of calls. With several threads each call forks and joins
them; when every core is busy with other processes, the join waits for the OS to schedule
each helper thread again, milliseconds per call whatever the call's work. PEFT's (and
diffusers') merge makes a few full-size calls per layer and suffers less. Measured on a
2-core machine at load average 11, 48 SDXL attention projections (70 M bfloat16
parameters, rank 16), same process, alternating: safemerge's fuse 25.8 s with 2 threads
and 2.2 s with 1; PEFT's ``merge(safe_merge=True)`` 8.4 s and 2.0 s.

The load average is a one-minute mean that also counts tasks waiting on a disk: a coarse
estimate, whose errors cost speed only. The thread count changes no result's guarantees:
a fuse's record keeps the count it ran with and its exact unfuse repeats it
(:func:`safemerge.merge.engine.pinned_threads`).
"""

from __future__ import annotations

import os

from safemerge.merge import engine


def merge_threads() -> int:
    """The threads to share a merge's blocks out to (torch's intra-op count, or the count
    of an enclosing :func:`safemerge.merge.engine.blocks_on`), at most the cores the
    1-minute load average of the other tasks leaves idle, and at least 1.

    On an idle machine this is torch's own count; on one whose cores are all taken it is
    1, the one thread that never waits for another.
    """
    current = engine.block_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): torch's count
        return current
    # The calling thread is itself one of the runnable tasks the load average counts (it
    # was busy building or loading the model just before): the others' load is one less.
    # Counting it as another's halved the threads on an idle 2-core machine (an SDXL UNet
    # fused at one thread while diffusers used two).
    others = max(0.0, load - 1.0)
    idle = round(_usable_cores() - others)
    return max(1, min(current, idle))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS: no affinity masks
        return os.cpu_count() or 1
