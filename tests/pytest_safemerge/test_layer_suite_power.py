"""The layer conformance suite fails every bug in ``buggy_layer_impls`` in the property meant
to catch it, and passes safemerge's engine and the correct references.

Each run drives pytest through ``pytester`` in an empty directory, as a downstream user
would: ``pytest --safemerge-impl=buggy_layer_impls:NAME``, ``-k`` picking one property
and ``--safemerge-examples=1`` the fewest examples (each cell of the exploration still
gets its own few, and the suite's hand-written cases), which keeps this module near a
minute.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes  # noqa: F401  (imported once: pytester's in-process runs forget modules)
import pytest

try:
    from . import buggy_layer_impls  # type: ignore[import-not-found]
except ImportError:
    import buggy_layer_impls  # type: ignore[no-redef]

from pytest_safemerge.suite.layer_contract import LAYER_PROPERTY_NAMES

HERE = Path(buggy_layer_impls.__file__).parent
FEW = "--safemerge-examples=1"
#: What Hypothesis prints before the failing case: a shrunk generated one, or one of the
#: suite's hand-written cases.
FAILING_CASE_MARKERS = ("Failing test case", "Falsifying example", "Failing explicit example")


def run_suite(pytester: pytest.Pytester, name: str, *args: str) -> pytest.RunResult:
    pytester.syspathinsert(HERE)
    return pytester.runpytest(
        f"--safemerge-impl=buggy_layer_impls:{name}", "-p", "no:cacheprovider", *args
    )


@pytest.mark.parametrize("name", list(buggy_layer_impls.BUGS))
def test_the_layer_suite_catches(pytester: pytest.Pytester, name: str) -> None:
    _, expected = buggy_layer_impls.BUGS[name]
    result = run_suite(pytester, name, FEW, "-k", expected)

    output = result.stdout.str()
    result.assert_outcomes(failed=1, deselected=14)
    prop = LAYER_PROPERTY_NAMES[expected]
    result.stdout.fnmatch_lines(
        [f"*AssertionError: [[]{prop}[]] *", f"FAILED *::TestLayerConformance::{expected}*"]
    )
    assert any(marker in output for marker in FAILING_CASE_MARKERS), output


@pytest.mark.parametrize("name", ["CORRECT_LAYER", "CORRECT_LAYER_ARITHMETIC"])
def test_the_layer_suite_passes_correct_references(pytester: pytest.Pytester, name: str) -> None:
    result = run_suite(pytester, name, FEW, "-k", "layer")

    result.assert_outcomes(passed=6, deselected=9)
    result.stdout.fnmatch_lines([f"layer contract (buggy_layer_impls:{name}):"])
