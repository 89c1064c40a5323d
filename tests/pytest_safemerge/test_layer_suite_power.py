"""The layer conformance suite fails every bug in ``support.buggy_layer_impls`` in the property
meant to catch it, and passes safemerge's engine and the correct references.

Each run drives pytest through ``pytester`` in an empty directory, as a downstream user
would: ``pytest --safemerge-impl=support.buggy_layer_impls:NAME``, ``-k`` picking one property
and ``--safemerge-examples=1`` the fewest examples (each cell of the exploration still
gets its own few, and the suite's hand-written cases), which keeps this module near a
minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes  # noqa: F401  (imported once: pytester's in-process runs forget modules)
import pytest

from pytest_safemerge.layer_strategies import ALL_TAGS, REFUSED_LAYER_KINDS
from pytest_safemerge.suite.layer_contract import LAYER_PROPERTY_NAMES

from support import buggy_layer_impls

#: tests/, the directory that makes ``support.buggy_layer_impls`` importable.
TESTS = Path(buggy_layer_impls.__file__).parents[1]
FEW = "--safemerge-examples=1"
#: What Hypothesis prints before the failing case: a shrunk generated one, or one of the
#: suite's hand-written cases.
FAILING_CASE_MARKERS = ("Failing test case", "Falsifying example", "Failing explicit example")


def run_suite(pytester: pytest.Pytester, name: str, *args: str) -> pytest.RunResult:
    pytester.syspathinsert(TESTS)
    return pytester.runpytest(
        f"--safemerge-impl=support.buggy_layer_impls:{name}", "-p", "no:cacheprovider", *args
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
    result.stdout.fnmatch_lines([f"layer contract (support.buggy_layer_impls:{name}):"])


def test_safemerge_passes_the_layer_suite_and_reports_what_it_met(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest(
        "--safemerge-suite", FEW, "-k", "layer", "--safemerge-report=report.json"
    )

    result.assert_outcomes(passed=6, deselected=9)
    result.stdout.fnmatch_lines(
        [
            "safemerge: implementation under test pytest_safemerge.implementations:SAFEMERGE; "
            "layer suite collected (fuse_layer; layer_kinds: *)",
            "layer contract (pytest_safemerge.implementations:SAFEMERGE):",
        ]
    )
    rows = {row["name"]: row for row in json.loads(Path("report.json").read_text())["results"]}
    assert set(rows) == set(LAYER_PROPERTY_NAMES.values())
    assert set(rows["layer refusal"]["kinds"]) == set(REFUSED_LAYER_KINDS)
    assert set(rows["layer accuracy"]["tags"]) == ALL_TAGS
    assert 0 < rows["layer accuracy"]["worst_fraction"] <= 1
    assert rows["layer round trip"]["worst_fraction"] == 0.0  # safemerge's unfuse is exact


TENSOR_ONLY = """
import torch

class TensorOnly:
    def fuse(self, weight, lora_A, lora_B, scale):
        weight.copy_(weight.float() + scale * (lora_B.float() @ lora_A.float()))

MERGER = TensorOnly()
"""


def test_an_implementation_without_fuse_layer_gets_no_layer_suite(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(tensor_only=TENSOR_ONLY)
    pytester.syspathinsert()
    result = pytester.runpytest("--safemerge-impl=tensor_only:MERGER", "--co")

    result.stdout.fnmatch_lines(
        [
            "safemerge: implementation under test tensor_only:MERGER; layer suite not "
            "collected (no fuse_layer)",
            "*9 tests collected*",
        ]
    )
    result.stdout.no_fnmatch_line("*test_layers*")


LINEAR_ONLY = """
from pytest_safemerge.implementations import SafemergeEngine

class LinearOnly(SafemergeEngine):
    layer_kinds = {LAYER_KINDS}

MERGER = LinearOnly()
"""


def test_layer_kinds_restrict_the_cases(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(linear_only=LINEAR_ONLY.replace("{LAYER_KINDS}", "{'linear', 'lora-bias'}"))
    pytester.syspathinsert()
    result = pytester.runpytest(
        "--safemerge-impl=linear_only:MERGER", FEW, "-k", "layer", "--safemerge-report=r.json"
    )

    result.assert_outcomes(passed=6, deselected=9)
    result.stdout.fnmatch_lines(
        ["*layer suite collected (fuse_layer; layer_kinds: linear, lora-bias)"]
    )
    rows = json.loads(Path("r.json").read_text())["results"]
    assert {tag for row in rows for tag in row["tags"]} == {"linear", "lora-bias"}
    refusal = next(row for row in rows if row["name"] == "layer refusal")
    assert "bias-overflow" in refusal["kinds"]


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        ("{'linear', 'qlora'}", "*layer_kinds=?'linear', 'qlora'? has unknown tags ?'qlora'?*"),
        ("{'lora-bias'}", "*layer_kinds=?'lora-bias'? names no layer kind*"),
        ("'linear'", "*layer_kinds='linear' must be a collection of tags*"),
    ],
)
def test_bad_layer_kinds_are_usage_errors(
    pytester: pytest.Pytester, kinds: str, message: str
) -> None:
    pytester.makepyfile(linear_only=LINEAR_ONLY.replace("{LAYER_KINDS}", kinds))
    pytester.syspathinsert()
    result = pytester.runpytest("--safemerge-impl=linear_only:MERGER")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
