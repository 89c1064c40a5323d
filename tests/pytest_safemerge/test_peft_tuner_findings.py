"""The tuner contract finds PEFT's tuner merge bugs, and passes what PEFT gets right.

One pytest run, in a subprocess from an empty directory, puts the installed PEFT under
``PeftTunerSuite`` as it is, Hypothesis derandomized (its ``ci`` profile). The run selects
each finding's cells and cells PEFT passes (:data:`PASSING`): exactly the findings' cells
fail, their messages naming the property, the layer kind and what was wrong. Findings were
made on PEFT :data:`FINDINGS_PEFT_VERSION`, each reproduced by a script in
``benchmarks/peft_findings/``; another release skips (its cells differ).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.suite_run import run_cells

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

FINDINGS_PEFT_VERSION = "0.21.2"
REPRODUCTIONS = Path(__file__).parents[2] / "benchmarks" / "peft_findings"
MODULE = "test_peft_tuners_under_the_suite.py"
SUITE_MODULE = """
from pytest_safemerge.peft_suite.tuner_contract import PeftTunerSuite


class TestTuners(PeftTunerSuite):
    pass
"""


@dataclass(frozen=True)
class Finding:
    name: str
    cell: str
    shows: str
    reproduction: str


FINDINGS = {
    "boft conv2d safe merge": Finding(
        "BOFT's Conv2d.merge(safe_merge=True) does not check the merged weight",
        "TestTuners::test_merge_refuses_non_finite[boft-float32]",
        r"conv2d: \[tuner refusal\] merge\(safe_merge=True\) did not refuse nan at entry \d+ "
        r"of boft_R\.default: the merged weight is not finite",
        "tuner_boft_conv2d_safe_merge.py",
    ),
    "osf merge twice": Finding(
        "OSF's merge() does not check what is merged: a second merge adds the delta again",
        "TestTuners::test_merging_twice_is_merging_once[osf-float32]",
        r"linear: \[tuner merge twice\] a second merge changed base_layer\.weight",
        "tuner_osf_merge_twice.py",
    ),
    "osf unmerge": Finding(
        "OSF's unmerge() only warns: the merged weight stays (a limitation)",
        "TestTuners::test_unmerge_round_trip[osf-float32]",
        r"linear: \[tuner round trip\] after merge and unmerge the weight is not the original",
        "tuner_osf_merge_twice.py",
    ),
    "hira double rounding": Finding(
        "HiRA rounds the delta to bfloat16 before the add",
        "TestTuners::test_merge_is_accurate[hira-bfloat16]",
        r"\[tuner accuracy\] the merged layer's weight is not what the unmerged layer computes",
        "tuner_double_rounding.py",
    ),
    "lokr conv1d effective": Finding(
        "LoKr on a Conv1d with use_effective_conv2d crashes in forward and merge (torch.kron)",
        "TestTuners::test_merge_is_accurate[lokr-float32]",
        r"conv1d__use_effective_conv2d: view size is not compatible with input tensor's size",
        "tuner_lokr_conv1d_effective.py",
    ),
    "ln tuning safe merge": Finding(
        "LN tuning's merge(safe_merge=True) swaps a NaN into the layer (safe_merge ignored)",
        "TestTuners::test_merge_refuses_non_finite[ln_tuning-float32]",
        r"linear: \[tuner refusal\] merge\(safe_merge=True\) did not refuse nan at entry \d+ "
        r"of ln_tuning_layers\.default\.\w+: the merged weight is not finite",
        "tuner_ln_tuning_safe_merge.py",
    ),
    "trainable tokens linear bias": Finding(
        "Trainable tokens on a Linear drop its bias until merged",
        "TestTuners::test_merge_is_accurate[trainable_tokens-float32]",
        r"linear: \[tuner accuracy\] the merged layer's bias is not what the unmerged layer",
        "tuner_trainable_tokens_linear_bias.py",
    ),
}
PASSING = (
    "TestTuners::test_merge_is_accurate[loha-bfloat16]",
    "TestTuners::test_refusal_leaves_layer_unchanged[lokr-float32]",
    "TestTuners::test_merging_twice_is_merging_once[vera-bfloat16]",
    # Values planted where the layer never reads them (VB-LoRA's unselected vectors,
    # PVeRA's variance half) need not be refused: these pass, every plant accounted for.
    "TestTuners::test_merge_refuses_non_finite[vblora-float32]",
    "TestTuners::test_merge_refuses_non_finite[pvera-float32]",
)
#: Cells skipped with PEFT's own reason (a tuner that never merges).
SKIPPED = {
    "TestTuners::test_merge_is_accurate[shadow-float32]": r"SHADOW does not merge: ShadowPEFT",
}


@pytest.fixture(scope="module")
def suite_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if peft.__version__ != FINDINGS_PEFT_VERSION:
        pytest.skip(f"findings made on PEFT {FINDINGS_PEFT_VERSION}, not {peft.__version__}")
    return run_cells(
        tmp_path_factory.mktemp("peft_tuners_under_the_suite"),
        MODULE,
        SUITE_MODULE,
        {finding.cell for finding in FINDINGS.values()} | set(PASSING) | set(SKIPPED),
        timeout=600,
    )


@pytest.mark.parametrize("key", list(FINDINGS), ids=[k.replace(" ", "-") for k in FINDINGS])
def test_the_contract_finds(suite_rows: dict[str, dict[str, Any]], key: str) -> None:
    finding = FINDINGS[key]
    row = suite_rows[finding.cell]
    assert row["result"] == "failed", f"{key} ({finding.name}) not caught: {row['message']}"
    assert re.search(finding.shows, row["message"]), row["message"]
    assert row["contract"] == "peft tuner" and row["oracle"].startswith("none")


def test_exactly_the_findings_fail(suite_rows: dict[str, dict[str, Any]]) -> None:
    failed = {cell for cell, row in suite_rows.items() if row["result"] == "failed"}
    expected = {finding.cell for finding in FINDINGS.values()}
    assert failed == expected, {cell: suite_rows[cell]["message"] for cell in failed ^ expected}


def test_peft_passes_the_other_cells(suite_rows: dict[str, dict[str, Any]]) -> None:
    for cell in PASSING:
        row = suite_rows[cell]
        assert row["result"] == "passed", f"{cell}: {row['message']}"
        assert row["examples"] > 0, cell  # a pass over nothing proves nothing


def test_every_finding_has_its_reproduction() -> None:
    for finding in FINDINGS.values():
        assert (REPRODUCTIONS / finding.reproduction).is_file(), finding.reproduction


def test_a_tuner_that_never_merges_is_skipped_with_peft_s_reason(
    suite_rows: dict[str, dict[str, Any]],
) -> None:
    for cell, reason in SKIPPED.items():
        row = suite_rows[cell]
        assert row["result"] == "skipped" and re.search(reason, row["message"]), row
