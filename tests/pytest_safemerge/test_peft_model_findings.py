"""The model contract finds PEFT's model-level merge bugs, and passes what PEFT gets right.

One pytest run, in a subprocess from an empty directory, puts the installed PEFT under
``PeftModelSuite`` as it is, Hypothesis derandomized (``CI=true`` and its ``ci`` profile:
the run is the same every time). The run selects each finding's cells and cells PEFT
passes (:data:`PASSING`), with the default examples budget (shared as in a full run: a
cell's examples do not depend on what is selected). Exactly the findings' cells fail,
their messages naming the property, the kind of case, the layer kind and the dtype; the
others pass. Findings were made on PEFT :data:`FINDINGS_PEFT_VERSION`, each reproduced by
a script in ``benchmarks/peft_findings/``; another release skips (its cells differ).
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
MODULE = "test_peft_models_under_the_suite.py"
SUITE_MODULE = """
from pytest_safemerge.peft_suite.model_contract import PeftModelSuite


class TestModels(PeftModelSuite):
    pass
"""


@dataclass(frozen=True)
class Finding:
    name: str
    cell: str  # TestModels::<test>[<kind>-<dtype>]
    shows: str  # a regular expression the cell's message matches
    reproduction: str


def _cell(test: str, kind: str, dtype: str) -> str:
    return f"TestModels::{test}[{kind}-{dtype}]"


def _case(kind: str, dtype: str) -> str:
    """How a message names the layer kind and dtype of its case."""
    return rf".*; {kind} model, torch\.{dtype}, seed"


FINDINGS = {
    "mha out_proj doubled": Finding(
        "LoRA on nn.MultiheadAttention adds the out_proj delta twice",
        _cell("test_merge_adapter_is_accurate", "multihead_attention", "float32"),
        r"random: \[merge accuracy\] the weight of layer\.base_layer\.out_proj is not within "
        r"its bound" + _case("multihead_attention", "float32"),
        "model_mha_out_proj_doubled.py",
    ),
    "refusal not atomic": Finding(
        "merge_and_unload(safe_merge=True) raises with the layers before the broken one merged",
        _cell("test_refused_merge_leaves_model_unchanged", "conv2d", "float32"),
        r"random: \[refusal atomicity\] merge_and_unload\(safe_merge=True\) refused \(NaNs "
        r"detected.*\) but changed \['first\.weight'\]" + _case("conv2d", "float32"),
        "model_refusal_not_atomic.py",
    ),
    "weighted rslora": Finding(
        "add_weighted_adapter scales an rsLoRA combination by sqrt(r) once more",
        _cell("test_weighted_cat_is_the_weighted_sum", "gpt2_conv1d", "float32"),
        r"rslora: \[weighted cat\] the combined adapter's weight on first is not within its "
        r"bound" + _case("gpt2_conv1d", "float32"),
        "model_weighted_rslora_scale.py",
    ),
    "weighted lora_bias": Finding(
        "add_weighted_adapter drops the adapters' lora_bias",
        _cell("test_weighted_adapter_reproduces_one_adapter", "linear", "bfloat16"),
        r"lora_bias: \[weighted reproduces\] the combined adapter's bias on first is not "
        r"within its bound" + _case("linear", "bfloat16"),
        "model_weighted_lora_bias_dropped.py",
    ),
    "weighted dora": Finding(
        "add_weighted_adapter drops a DoRA adapter's trained magnitude",
        _cell("test_weighted_adapter_reproduces_one_adapter", "linear", "bfloat16"),
        r"dora: \[weighted reproduces\] the combined adapter's weight on first is not within "
        r"its bound" + _case("linear", "bfloat16"),
        "model_weighted_dora_magnitude.py",
    ),
    "conv3d merge": Finding(
        "a Conv3d kernel (1, 1, k) takes the Conv2d 1x1 shortcut and fails to merge",
        _cell("test_merge_adapter_is_accurate", "conv3d_1x1xk", "float32"),
        r"random: \[merge accuracy\] merge_adapter crashed on a finite case: RuntimeError: "
        r"The size of tensor a" + _case("conv3d_1x1xk", "float32"),
        "conv3d_pointwise.py",
    ),
    "double rounding": Finding(
        "the delta is rounded to the weight's dtype before the add",
        _cell("test_merge_adapter_is_accurate", "embedding", "float16"),
        r"random: \[merge accuracy\] the weight of layer is not within its bound"
        + _case("embedding", "float16"),
        "double_rounding.py",
    ),
}
PASSING = (
    _cell("test_merge_adapter_is_accurate", "linear", "float32"),
    _cell("test_merge_adapter_twice_is_once", "conv2d_1xk", "bfloat16"),
    _cell("test_unmerge_adapter_round_trip", "linear", "float32"),
    _cell("test_merge_and_unload_equals_merge_adapter", "gpt2_conv1d", "float16"),
    _cell("test_delete_merged_adapter", "embedding", "float32"),
)


@pytest.fixture(scope="module")
def suite_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if peft.__version__ != FINDINGS_PEFT_VERSION:
        pytest.skip(f"findings made on PEFT {FINDINGS_PEFT_VERSION}, not {peft.__version__}")
    return run_cells(
        tmp_path_factory.mktemp("peft_models_under_the_suite"),
        MODULE,
        SUITE_MODULE,
        {finding.cell for finding in FINDINGS.values()} | set(PASSING),
        timeout=600,
        env={"CI": "true"},
    )


@pytest.mark.parametrize("key", list(FINDINGS), ids=[k.replace(" ", "-") for k in FINDINGS])
def test_the_contract_finds(suite_rows: dict[str, dict[str, Any]], key: str) -> None:
    finding = FINDINGS[key]
    row = suite_rows[finding.cell]
    assert row["result"] == "failed", f"{key} ({finding.name}) not caught: {row['message']}"
    assert re.search(finding.shows, row["message"]), row["message"]
    assert row["contract"] == "peft model"


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
