"""The built-in conformance suite fails every bug in ``support.buggy_impls`` and passes correct
code.

Each run drives pytest through ``pytester`` in an empty directory, as a downstream user
would: ``pytest --safemerge-impl=support.buggy_impls:NAME``. Most bugs run only the property
expected to catch them (``-k``), which keeps this module within CI's time; a few run the
whole suite, to show the other properties do not stand in the way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import pytest_safemerge
import safemerge
from safemerge import names

from support import buggy_impls

#: tests/, the directory that makes ``support.buggy_impls`` importable.
TESTS = Path(buggy_impls.__file__).parents[1]
#: A subprocess's import path: tests/ with the directories safemerge and pytest_safemerge
#: come from (on its own, tests/ has tests/safemerge and tests/pytest_safemerge found as
#: namespace packages ahead of the editable install).
IMPORT_PATH = [
    str(TESTS),
    str(Path(safemerge.__file__).parents[1]),
    str(Path(pytest_safemerge.__file__).parents[1]),
]

#: Cells of the tensor contract: each property on each weight dtype.
TENSOR_CELLS = 9 * len(names.WEIGHT_DTYPES)
FLOAT8 = ("float8_e4m3fn", "float8_e5m2")
#: What the failure says for bugs whose kind of failure matters.
CAUGHT_AS = {
    "REFUSES_BY_CRASHING": "*refused by crashing: RuntimeError: Boolean value of Tensor*",
    "DELTA_GUARDED": "*fuse refused a merge whose exact result fits*",
}
#: Bugs that fail every kind of case in every cell (so each pays Hypothesis' shrinking
#: many times over) run on one weight dtype where they show, to keep this module's time.
ONE_DTYPE = {
    "BACKUP_KEPT_ONCE": "float32",
    "RETURNS_SELF": "float32",
    "RETURNS_FLOAT32": "float16",  # a float32 weight may come back as float32
    "SCALES_LORA_B_IN_PLACE": "float32",
}
#: Bugs run through the whole suite rather than their one property.
WHOLE_SUITE = frozenset({"GUARD_MISSES_LAST_ELEMENT", "WRITES_BEFORE_CHECK", "FLOAT16_MATMUL"})
#: Bugs the suite does not catch: name -> why. Each is a strict xfail, which fails (and
#: belongs out of here) once the suite learns to catch the bug.
UNCAUGHT: dict[str, str] = {}
#: Bugs the suite catches only by chance: name -> (a Hypothesis seed under which its
#: property misses the bug, why). Run in a subprocess with that seed, away from the
#: session's (possibly derandomized) Hypothesis profile, as strict xfails.
INTERMITTENT: dict[str, tuple[int, str]] = {}
#: Bugs that random draws used to miss under these seeds, now caught whatever the seed
#: by the suite's hand-written cases (pytest_safemerge/suite/known_cases.py): each runs
#: seeded, like the intermittent ones, and must be caught.
ONCE_MISSED_UNDER_SEED: dict[str, int] = {
    "UNFUSE_IN_WEIGHT_DTYPE": 12,
    "SCALE_ZERO_SHORTCUT": 1,
    "ADDMM_ALPHA_ZERO": 1,
    "ZERO_B_SHORTCUT": 4,
    "FLUSHES_SUBNORMALS": 5,
}
#: What Hypothesis prints before the failing case: a shrunk generated one ("Falsifying
#: example" before 6.13x), or one of the suite's hand-written minimal cases.
SHRUNK_CASE_MARKERS = ("Failing test case", "Falsifying example", "Failing explicit example")


def run_suite(pytester: pytest.Pytester, name: str, *args: str) -> pytest.RunResult:
    """The suite against ``support.buggy_impls:NAME``, in this process."""
    pytester.syspathinsert(TESTS)
    return pytester.runpytest(
        f"--safemerge-impl=support.buggy_impls:{name}", "-p", "no:cacheprovider", *args
    )


def run_suite_seeded(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str, seed: int, *args: str
) -> pytest.RunResult:
    """The suite in a fresh process with Hypothesis seeded: no conftest, no example
    database, no derandomized profile (Hypothesis loads its own "ci" profile when it sees
    a CI variable) stand between the seed and the cases drawn."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([*IMPORT_PATH, os.environ.get("PYTHONPATH", "")])
    )
    return pytester.runpytest_subprocess(
        f"--safemerge-impl=support.buggy_impls:{name}",
        "-p",
        "no:cacheprovider",
        "--hypothesis-profile=default",
        f"--hypothesis-seed={seed}",
        *args,
    )


def _bug_params() -> list[object]:
    params = []
    for name in buggy_impls.BUGS:
        marks = []
        if name in UNCAUGHT:
            marks.append(pytest.mark.xfail(strict=True, reason=UNCAUGHT[name]))
        if name in INTERMITTENT:
            seed, why = INTERMITTENT[name]
            marks.append(pytest.mark.xfail(strict=True, reason=f"missed with seed {seed}: {why}"))
        if name in buggy_impls.NEEDS_ACCELERATOR:
            marks.append(
                pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="the bug shows only on a CUDA device"
                )
            )
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _bug_params())
def test_the_suite_catches(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _, expected = buggy_impls.BUGS[name]
    args = [] if name in WHOLE_SUITE else ["-k", expected]
    if name in ONE_DTYPE:
        args.append(f"--safemerge-dtypes={ONE_DTYPE[name]}")
    if name in buggy_impls.NEEDS_ACCELERATOR:
        args.append("--safemerge-device=cuda")
    if name in INTERMITTENT:
        result = run_suite_seeded(pytester, monkeypatch, name, INTERMITTENT[name][0], *args)
    elif name in ONCE_MISSED_UNDER_SEED:
        result = run_suite_seeded(pytester, monkeypatch, name, ONCE_MISSED_UNDER_SEED[name], *args)
    else:
        result = run_suite(pytester, name, *args)

    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    result.stdout.fnmatch_lines([f"FAILED *::{expected}[[]*[]]*"])
    assert any(marker in output for marker in SHRUNK_CASE_MARKERS), (
        f"no shrunk Hypothesis case in the report of {expected}:\n{output}"
    )
    if name in CAUGHT_AS:
        result.stdout.fnmatch_lines([f"*{CAUGHT_AS[name]}*"])


@pytest.mark.parametrize("name", ["CORRECT", "CORRECT_RETURNING", "CORRECT_DECLARING_EVERYTHING"])
def test_the_suite_passes_a_correct_implementation(pytester: pytest.Pytester, name: str) -> None:
    result = run_suite(pytester, name, "--safemerge-report=report.json")

    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=TENSOR_CELLS)
    rows = _rows(pytester)
    assert len(rows) == TENSOR_CELLS and {row["result"] for row in rows} == {"passed"}


def test_a_correct_merge_without_float8_fails_only_its_float8_cells(
    pytester: pytest.Pytester,
) -> None:
    result = run_suite(pytester, "CORRECT_WITHOUT_FLOAT8", "--safemerge-report=report.json")

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    rows = _rows(pytester)
    assert len(rows) == TENSOR_CELLS
    float8 = [row for row in rows if row["dtype"] in FLOAT8]
    others = [row for row in rows if row["dtype"] not in FLOAT8]
    # Every other cell ran its cases and passed, and is reported so.
    assert {row["result"] for row in others} == {"passed"}
    assert all(row["examples"] > 0 for row in others)
    # Every float8 cell failed: as unsupported where a finite merge crashed, and as a
    # refusal by crashing where a refusal was due.
    assert {row["result"] for row in float8} == {"failed"}
    accuracy = [row for row in float8 if row["property"] == "accuracy"]
    assert {row["status"] for row in accuracy} == {"unsupported"}
    assert all(
        "declare what the implementation supports (dtypes =" in row["message"] for row in accuracy
    )
    refusal = [row for row in float8 if row["property"] == "refusal"]
    assert all("refused by crashing: NotImplementedError" in row["message"] for row in refusal)
    result.stdout.fnmatch_lines(["  accuracy  *ok*ok*ok*unsupported*unsupported"])


def test_declared_dtypes_skip_the_others_with_the_reason(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "CORRECT_DECLARING_NO_FLOAT8", "--safemerge-report=report.json")

    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    float8_cells = TENSOR_CELLS * len(FLOAT8) // len(names.WEIGHT_DTYPES)
    result.assert_outcomes(passed=TENSOR_CELLS - float8_cells, skipped=float8_cells)
    rows = _rows(pytester)
    skipped = [row for row in rows if row["result"] == "skipped"]
    assert {row["dtype"] for row in skipped} == set(FLOAT8)
    assert all("does not declare float8_e" in row["message"] for row in skipped)


def test_dtypes_option_narrows_a_run(pytester: pytest.Pytester) -> None:
    result = run_suite(pytester, "CORRECT", "--safemerge-dtypes=bfloat16", "-k", "accurate", "-rs")

    result.assert_outcomes(
        passed=1, skipped=len(names.WEIGHT_DTYPES) - 1, deselected=TENSOR_CELLS - 5
    )
    result.stdout.fnmatch_lines(["*float32 not selected (--safemerge-dtypes=bfloat16)*"])


def _rows(pytester: pytest.Pytester) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((pytester.path / "report.json").read_text())["results"]
    return rows
