"""A pytest plugin that runs the whole session on the engine's GPU path, on the CPU.

CI has no GPU; ``-p support.device_path`` makes :mod:`safemerge.merge.on_device` take
every fuse and unfuse, so that the tests written for the engine's contract (atomicity,
exact unfuse, refusal counts, bounds) hold it to the same contract.
"""

from __future__ import annotations

import pytest

from safemerge.merge import on_device


def pytest_configure(config: pytest.Config) -> None:
    forced = on_device.forced()
    forced.__enter__()

    def leave() -> None:
        forced.__exit__(None, None, None)

    config.add_cleanup(leave)
