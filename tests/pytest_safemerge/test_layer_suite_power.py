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
from typing import Any

import bitsandbytes  # noqa: F401  (imported once: pytester's in-process runs forget modules)
import pytest

from pytest_safemerge.layer_strategies import ALL_TAGS, REFUSED_LAYER_KINDS
from pytest_safemerge.suite.layer_contract import LAYER_CELLS, LAYER_DTYPES, LAYER_PROPERTY_NAMES

from support import buggy_layer_impls

#: tests/, the directory that makes ``support.buggy_layer_impls`` importable.
TESTS = Path(buggy_layer_impls.__file__).parents[1]
FEW = "--safemerge-examples=1"
#: The layer contract's cells: each property on each layer kind (and dtype).
CELLS_PER_PROPERTY = len(LAYER_CELLS)
LAYER_CELL_COUNT = len(LAYER_PROPERTY_NAMES) * CELLS_PER_PROPERTY
TENSOR_CELL_COUNT = 9 * 5
#: What Hypothesis prints before the failing case: a shrunk generated one, or one of the
#: suite's hand-written cases.
FAILING_CASE_MARKERS = ("Failing test case", "Falsifying example", "Failing explicit example")


def run_suite(pytester: pytest.Pytester, name: str, *args: str) -> pytest.RunResult:
    pytester.syspathinsert(TESTS)
    return pytester.runpytest(
        f"--safemerge-impl=support.buggy_layer_impls:{name}", "-p", "no:cacheprovider", *args
    )


#: Bugs that fail every kind of case in many cells (each failure shrunk) run on the one
#: cell named here, where they show, to keep this module's time.
ONE_CELL = {"SCALES_ADAPTER_IN_PLACE": "linear-float32"}  # shows with float32 adapters


@pytest.mark.parametrize("name", list(buggy_layer_impls.BUGS))
def test_the_layer_suite_catches(pytester: pytest.Pytester, name: str) -> None:
    _, expected = buggy_layer_impls.BUGS[name]
    selection = expected if name not in ONE_CELL else f"{expected} and {ONE_CELL[name]}"
    result = run_suite(pytester, name, FEW, "-k", selection)

    output = result.stdout.str()
    outcomes = result.parseoutcomes()
    cells = 1 if name in ONE_CELL else CELLS_PER_PROPERTY
    assert outcomes.get("failed", 0) >= 1, output
    assert sum(outcomes.get(key, 0) for key in ("passed", "failed", "skipped")) == cells
    assert outcomes["deselected"] == TENSOR_CELL_COUNT + LAYER_CELL_COUNT - cells
    prop = LAYER_PROPERTY_NAMES[expected]
    result.stdout.fnmatch_lines(
        [f"*: [[]{prop}[]] *", f"FAILED *::TestLayerConformance::{expected}[[]*[]]*"]
    )
    assert any(marker in output for marker in FAILING_CASE_MARKERS), output


@pytest.mark.parametrize("name", ["CORRECT_LAYER", "CORRECT_LAYER_ARITHMETIC"])
def test_the_layer_suite_passes_correct_references(pytester: pytest.Pytester, name: str) -> None:
    result = run_suite(pytester, name, FEW, "-k", "layer")

    result.assert_outcomes(passed=LAYER_CELL_COUNT, deselected=TENSOR_CELL_COUNT)
    result.stdout.fnmatch_lines([f"layer contract (support.buggy_layer_impls:{name}; * examples):"])


def test_safemerge_passes_the_layer_suite_and_reports_what_it_met(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest(
        "--safemerge-suite", FEW, "-k", "layer", "--safemerge-report=report.json"
    )

    result.assert_outcomes(passed=LAYER_CELL_COUNT, deselected=TENSOR_CELL_COUNT)
    result.stdout.fnmatch_lines(
        [
            "safemerge: implementation under test pytest_safemerge.implementations:SAFEMERGE; "
            "layer suite collected (fuse_layer; layer_kinds: *)",
            "layer contract (pytest_safemerge.implementations:SAFEMERGE; * examples):",
        ]
    )
    rows = json.loads(Path("report.json").read_text())["results"]
    assert len(rows) == LAYER_CELL_COUNT
    assert {(row["kind"], row["dtype"]) for row in rows} == {
        (cell.layer, cell.dtype) for cell in LAYER_CELLS
    }
    by_property: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_property.setdefault(row["property"], []).append(row)
    assert set(by_property) == set(LAYER_PROPERTY_NAMES.values())
    # Together, the cells of a property met every kind of case and every tag.
    refusal_kinds = {kind for row in by_property["layer refusal"] for kind in row["kinds"]}
    assert refusal_kinds == set(REFUSED_LAYER_KINDS)
    assert {tag for row in by_property["layer accuracy"] for tag in row["tags"]} == ALL_TAGS
    assert all(0 <= row["worst_fraction"] <= 1 for row in by_property["layer accuracy"])
    assert {row["worst_fraction"] for row in by_property["layer round trip"]} == {0.0}  # exact


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
            f"*{TENSOR_CELL_COUNT} tests collected*",
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

    linear_cells = 6 * len(LAYER_DTYPES)
    result.assert_outcomes(
        passed=linear_cells,
        skipped=LAYER_CELL_COUNT - linear_cells,
        deselected=TENSOR_CELL_COUNT,
    )
    result.stdout.fnmatch_lines(
        ["*layer suite collected (fuse_layer; layer_kinds: linear, lora-bias)"]
    )
    rows = json.loads(Path("r.json").read_text())["results"]
    ran = [row for row in rows if row["result"] == "passed"]
    assert {tag for row in ran for tag in row["tags"]} == {"linear", "lora-bias"}
    assert {row["kind"] for row in ran} == {"linear"}
    skipped = [row for row in rows if row["result"] == "skipped"]
    assert all("does not declare" in row["message"] for row in skipped)
    refusal = [row for row in ran if row["property"] == "layer refusal"]
    assert all("bias-overflow" in row["kinds"] for row in refusal)


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
