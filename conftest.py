"""Hypothesis profiles for the whole repository.

``dev`` (default) explores freely; ``ci`` (loaded when the CI environment variable is
set) is derandomized so that CI runs repeat exactly. Tensor work has no deadline: the
first call of a torch kernel can take far longer than the rest.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Plugin tests drive pytest through pytester (tests/pytest_safemerge).
pytest_plugins = ["pytester"]

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

settings.register_profile("dev", max_examples=60, **_COMMON)
settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(
    os.environ.get("SAFEMERGE_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


def pytest_configure(config: object) -> None:
    # Under pytest-xdist every worker is its own process: torch's OpenMP threads of
    # several workers on the same cores spin against each other and slow everything
    # down many times over. One intra-op thread per worker keeps the cores shared fairly.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
