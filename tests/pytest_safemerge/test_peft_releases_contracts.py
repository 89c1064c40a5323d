"""The model-level and tuner contracts (``--safemerge-peft``) against an older PEFT release.

One pytest run of ``pytest --safemerge-peft``, in a subprocess from an empty directory
with PEFT :data:`~support.peft_release.RELEASE` first on ``PYTHONPATH``
(:mod:`support.peft_release`), in the half-precision dtypes (every finding of the release
shows there; float32 adds none) at a small examples budget. The run used that release;
no cell errored and no failure shows the contract meeting an API the release lacks; the
cells of the tuners and layer kinds the release lacks were skipped naming it, and the
options it lacks were left out of the cases naming it; exactly the cells of
:data:`FINDINGS` failed, each message showing its finding. Without the release's folder
the test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from support.peft_release import (
    RELEASE,
    RELEASE_DIR,
    Finding,
    ReleaseRun,
    assert_exactly_the_findings_fail,
    run_release,
)

pytest.importorskip("peft")
pytest.importorskip("transformers")

#: Examples per property (shared among its cells): every finding below still shows.
EXAMPLES = 10
#: The cells run: the model contract has no dtype option, so -k selects the dtypes.
SELECT = "not float32"
DTYPES = ("float16", "bfloat16")
#: More of the run's conftest: the cells that errored (a failed setup or teardown; the
#: report's rows say "failed" for both), and the contract's reason for each LoRA option
#: the release lacks on a layer kind it supports. A plugin object, not conftest hooks:
#: the contracts' modules lie outside this directory, so its conftest hooks never see
#: their reports.
CONFTEST = """

class _Errors:
    def __init__(self):
        self.cells = []

    def pytest_runtest_logreport(self, report):
        if report.failed and report.when != "call":
            self.cells.append(f"{report.nodeid} ({report.when})")


_ERRORS = _Errors()


def pytest_sessionstart(session):
    session.config.pluginmanager.register(_ERRORS, "release-errors")


def pytest_sessionfinish(session):
    from pytest_safemerge.peft_suite import features
    from pytest_safemerge.peft_suite.models import KINDS

    lacking = {
        f"{option} on {kind}": reason
        for kind in KINDS
        if features.kind_unsupported(kind) is None
        for option in features.OPTIONS
        if (reason := features.option_unsupported(kind, option)) is not None
    }
    with open("contract.json", "w") as stream:
        json.dump({"errors": _ERRORS.cells, "options_lacking": lacking}, stream)
"""
#: How a cell's failure reads when the contract calls an API the release does not have
#: (a keyword, an attribute, a module) rather than finding a bug of its merge.
API_CRASH = re.compile(
    r"unexpected keyword argument|has no attribute|cannot import name|No module named"
    r"|ImportError|missing \d+ required (?:positional|keyword-only) argument"
    r"|takes \d+ positional arguments? but \d+ (?:was|were) given"
)

#: The layer kinds of the model contract the release supports, and those it lacks.
MODEL_KINDS = ("linear", "embedding", "conv2d", "conv2d_1xk", "gpt2_conv1d")
MODEL_KINDS_LACKING = {
    "conv1d": "Conv1d",
    "conv1d_k": "Conv1d",
    "conv3d": "Conv3d",
    "conv3d_1x1xk": "Conv3d",
    "multihead_attention": "MultiheadAttention",
}
MODEL_TESTS = (
    "delete_merged_adapter",
    "merge_adapter_is_accurate",
    "merge_adapter_twice_is_once",
    "merge_and_unload_equals_merge_adapter",
    "refused_merge_leaves_model_unchanged",
    "unmerge_adapter_round_trip",
    "weighted_adapter_reproduces_one_adapter",
    "weighted_cat_is_the_weighted_sum",
)
#: The tuners of the contract the release does not have.
TUNERS_LACKING = ("boft", "fourierft", "glora", "hra", "vera")
TUNER_TESTS = (
    "merge_is_accurate",
    "merge_refuses_non_finite",
    "merging_twice_is_merging_once",
    "refusal_leaves_layer_unchanged",
    "unmerge_round_trip",
)
#: The cells skipped for what the release lacks, and a pattern their reason matches.
SKIPPED = {
    **{
        f"test_{test}[{kind}-{dtype}]": rf"PEFT {re.escape(RELEASE)} refuses {kind}: Target "
        rf"module {module}\(.* is not supported"
        for kind, module in MODEL_KINDS_LACKING.items()
        for test in MODEL_TESTS
        for dtype in DTYPES
    },
    **{
        f"test_{test}[{tuner}-{dtype}]": rf"PEFT {re.escape(RELEASE)} has no {tuner.upper()} "
        r"tuner that merges"
        for tuner in TUNERS_LACKING
        for test in TUNER_TESTS
        for dtype in DTYPES
    },
}
#: The LoRA options the release lacks on the kinds it supports (left out of the cases, not
#: cells): the contract's reason for each, as a pattern.
OPTIONS_LACKING = {
    **{
        f"lora_bias on {kind}": rf"PEFT {re.escape(RELEASE)}'s LoraConfig has no lora_bias"
        for kind in MODEL_KINDS
    },
    "dora on embedding": rf"PEFT {re.escape(RELEASE)} refuses dora on embedding: Embedding "
    r"does not support DoRA",
    # 0.10.0's DoRA crashes on GPT-2's Conv1D (its norm is taken along the wrong axis): left
    # out of the cases too, and a finding of every gpt2_conv1d cell (below).
    "dora on gpt2_conv1d": rf"PEFT {re.escape(RELEASE)} crashes injecting dora on gpt2_conv1d: "
    r"RuntimeError: The size of tensor a",
}


def _model_cells(test: str, kinds: tuple[str, ...] = MODEL_KINDS) -> tuple[str, ...]:
    return tuple(f"test_{test}[{kind}-{dtype}]" for kind in kinds for dtype in DTYPES)


def _tuner_cells(tests: tuple[str, ...], tuner: str) -> tuple[str, ...]:
    return tuple(f"test_{test}[{tuner}-{dtype}]" for test in tests for dtype in DTYPES)


FINDINGS = {
    "refusal not atomic": Finding(
        "merge_and_unload(safe_merge=True) raises on the broken adapter with the modules "
        "before it merged and unloaded",
        _model_cells("refused_merge_leaves_model_unchanged"),
        (
            r"random: \[refusal atomicity\] merge_and_unload\(safe_merge=True\) refused "
            r"\(NaNs detected in the merged weights.*\) but changed \['first\.weight'\]",
        ),
        "not fixed (0.21.2 has it: benchmarks/peft_findings/model_refusal_not_atomic.py)",
    ),
    "delete_adapter leaves the delta": Finding(
        "delete_adapter of a merged adapter deletes it and leaves its delta in the weights",
        _model_cells("delete_merged_adapter"),
        (
            r"random: \[delete merged\] after delete_adapter, the weight of first is not "
            r"within its bound",
        ),
        "0.21 (delete_adapter refuses a merged adapter)",
    ),
    "weighted rslora": Finding(
        "add_weighted_adapter keeps use_rslora in the combined config: an rsLoRA adapter "
        "comes out sqrt(new_rank) times too strong",
        (
            *_model_cells("weighted_cat_is_the_weighted_sum"),
            *_model_cells("weighted_adapter_reproduces_one_adapter"),
        ),
        (
            r"rslora: \[weighted cat\] the combined adapter's weight on first is not within "
            r"its bound",
            r"rslora: \[weighted reproduces\] the combined adapter's weight on first is not "
            r"within its bound",
        ),
        "not fixed (0.21.2 has it: benchmarks/peft_findings/model_weighted_rslora_scale.py)",
    ),
    "weighted dora": Finding(
        "add_weighted_adapter replaces a DoRA adapter's trained magnitude by the initial norm",
        _model_cells("weighted_adapter_reproduces_one_adapter", ("linear", "conv2d", "conv2d_1xk")),
        (
            r"dora: \[weighted reproduces\] the combined adapter's weight on first is not "
            r"within its bound",
        ),
        "not fixed (0.21.2 has it: benchmarks/peft_findings/model_weighted_dora_magnitude.py)",
    ),
    "double rounding": Finding(
        "merge_adapter rounds the delta to the weight's dtype, then the sum: two roundings",
        (
            *(f"test_merge_adapter_is_accurate[{kind}-float16]" for kind in MODEL_KINDS),
            "test_merge_adapter_is_accurate[gpt2_conv1d-bfloat16]",
        ),
        (
            r"random: \[merge accuracy\] the weight of first is not within its bound.*"
            r"torch\.float16",
            r"random: \[merge accuracy\] the weight of layer is not within its bound.*"
            r"gpt2_conv1d model, torch\.bfloat16",
        ),
        "not fixed (0.21.2 has it: benchmarks/peft_findings/double_rounding.py)",
    ),
    "loha/lokr half precision": Finding(
        "LoHa and LoKr merges in half precision are not what the unmerged layer computes "
        "within one rounding",
        (
            "test_merge_is_accurate[loha-bfloat16]",
            "test_merge_is_accurate[lokr-float16]",
            "test_merge_is_accurate[lokr-bfloat16]",
        ),
        (
            r"linear: \[tuner accuracy\] the merged layer's weight is not what the unmerged "
            r"layer computes.*\(loha on a linear layer \(bfloat16\)",
            r"linear: \[tuner accuracy\] the merged layer's weight is not what the unmerged "
            r"layer computes.*\(lokr on a linear layer \(float16\)",
        ),
        "after 0.10.0 (not among the findings on 0.21.2)",
    ),
    "oft half precision crash": Finding(
        "OFT's merge multiplies the half-precision weight by its float32 rotation: every "
        "half-precision merge crashes on the dtype mismatch",
        _tuner_cells(
            (
                "merge_is_accurate",
                "merge_refuses_non_finite",
                "merging_twice_is_merging_once",
                "unmerge_round_trip",
            ),
            "oft",
        ),
        (
            r"expected m1 and m2 to have the same dtype, but got: c10::Half != float",
            r"expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float",
            r"\[tuner refusal\] refused by crashing on .*RuntimeError: expected m1 and m2 to "
            r"have the same dtype",
        ),
        "after 0.15.2 (0.15.2 still crashes; 0.20.0 does not)",
    ),
    "dora on gpt2_conv1d crashes": Finding(
        "injecting a DoRA adapter on GPT-2's Conv1D crashes (the weight norm is taken along "
        "the wrong axis): a crash, not a refusal, so every gpt2_conv1d cell fails with it",
        tuple(cell for test in MODEL_TESTS for cell in _model_cells(test, ("gpt2_conv1d",))),
        (
            rf"PEFT {re.escape(RELEASE)} crashes injecting dora on gpt2_conv1d: RuntimeError: "
            r"The size of tensor a \(5\) must match the size of tensor b \(6\)",
        ),
        "by 0.15.2 (0.15.2 injects it)",
    ),
    "ia3 conv2d unmerge": Finding(
        "IA3 Conv2d's unmerge multiplies the bias by the scaling again instead of dividing",
        _tuner_cells(("unmerge_round_trip",), "ia3"),
        (
            r"conv2d: \[tuner round trip\] after merge and unmerge the bias is not the "
            r"original within its bound.*\(ia3 on a conv2d layer",
        ),
        "after 0.10.0 (not among the findings on 0.21.2)",
    ),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> ReleaseRun:
    """One run of both contracts against the release."""
    return run_release(
        tmp_path_factory.mktemp("peft_release_contracts"),
        ["--safemerge-peft", f"--safemerge-examples={EXAMPLES}", "-k", SELECT],
        CONFTEST,
    )


@pytest.fixture(scope="module")
def contract(run: ReleaseRun) -> dict[str, Any]:
    """What the run's conftest wrote: the cells that errored, the options lacking."""
    path = run.directory / "contract.json"
    assert path.is_file(), run.output
    written: dict[str, Any] = json.loads(path.read_text())
    return written


def test_the_run_used_the_release(run: ReleaseRun) -> None:
    assert run.peft["version"] == RELEASE
    assert Path(run.peft["path"]).is_relative_to(RELEASE_DIR), run.peft["path"]


def test_both_contracts_ran_in_the_selected_dtypes(run: ReleaseRun) -> None:
    contracts = {(row["contract"], row["dtype"]) for row in run.rows.values()}
    assert contracts == {(c, d) for c in ("peft model", "peft tuner") for d in DTYPES}


def test_no_cell_errored(contract: dict[str, Any]) -> None:
    assert contract["errors"] == []


def test_no_cell_failed_on_an_api_the_release_lacks(run: ReleaseRun) -> None:
    crashed = {
        cell: row["message"]
        for cell, row in run.rows.items()
        if row["result"] == "failed" and API_CRASH.search(str(row["message"]))
    }
    assert not crashed


def test_what_the_release_lacks_is_skipped_with_its_reason(run: ReleaseRun) -> None:
    skipped = {cell: row["message"] for cell, row in run.rows.items() if row["result"] == "skipped"}
    assert skipped.keys() == SKIPPED.keys()
    wrong = {
        cell: skipped[cell]
        for cell, reason in SKIPPED.items()
        if not re.match(reason, skipped[cell])
    }
    assert not wrong


def test_the_options_the_release_lacks_are_left_out_with_its_reason(
    run: ReleaseRun, contract: dict[str, Any]
) -> None:
    lacking: dict[str, str] = contract["options_lacking"]
    assert lacking.keys() == OPTIONS_LACKING.keys()
    wrong = {
        key: lacking[key]
        for key, reason in OPTIONS_LACKING.items()
        if not re.match(reason, lacking[key])
    }
    assert not wrong
    # The weighted cells run one kind of case per option: none for an option left out.
    for cell in _model_cells("weighted_adapter_reproduces_one_adapter"):
        kind = cell.split("[")[1].split("-")[0]
        ran = set(run.rows[cell]["kinds"])
        assert "lora_bias" not in ran, cell
        assert ("dora" in ran) == (f"dora on {kind}" not in OPTIONS_LACKING), (cell, ran)


def test_exactly_the_findings_of_the_release_fail(run: ReleaseRun) -> None:
    assert_exactly_the_findings_fail(run.rows, FINDINGS)


def test_the_other_cells_pass_over_real_cases(run: ReleaseRun) -> None:
    passed = [row for row in run.rows.values() if row["result"] == "passed"]
    assert passed and all(row["examples"] > 0 for row in passed)
