"""The conformance suite finds diffusers' LoRA fuse bugs, and passes what diffusers gets right.

One pytest run, in a subprocess from an empty directory, puts both diffusers paths under
the suites as a diffusers maintainer would, with no masking (:data:`SUITE_MODULE`):
``DIFFUSERS_LEGACY`` (``LoRACompatibleLinear`` / ``LoRACompatibleConv``) and
``DIFFUSERS_PEFT`` (``ModelMixin.fuse_lora(safe_fusing=True)``, which merges through PEFT),
each under ``ConformanceSuite`` and ``LayerConformanceSuite``. The run selects
each finding's cells, cells diffusers passes (:data:`PASSING`) and cells outside its
declarations (:data:`SKIPPED`); every cell is its own verdict. Hypothesis runs
derandomized (its ``ci`` profile): the run is the same every time.

Exactly the cells of :data:`FINDINGS` fail, their messages naming the property, the kind
of case, the layer kind and the dtype. A finding is diffusers' own (reproduced in
``benchmarks/diffusers_findings/``) or PEFT's, which diffusers' PEFT path inherits
(reproduced in ``benchmarks/peft_findings/``): those that show within this run's budget;
the rest (several adapters not atomic, Conv3d pointwise kernels) need hundreds of examples
and are ``test_peft_findings.py``'s. The pipeline-level findings are
``test_diffusers_pipeline.py``'s. On another diffusers or PEFT, a finding that no longer
shows fails with "... fixed finding ...": update :data:`FINDINGS` and the README's table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.suite_run import run_cells

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

FINDINGS_VERSIONS = {"diffusers": "0.42.1", "PEFT": "0.21.2"}
BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
MODULE = "test_diffusers_under_the_suite.py"
#: Examples per property, shared among its cells in the run: enough for every finding to
#: show in its cells, few enough for the run to take well under a minute.
EXAMPLES = 60

SUITE_MODULE = """
import pytest

from pytest_safemerge.suite import ConformanceSuite, LayerConformanceSuite
from pytest_safemerge.targets.diffusers import DIFFUSERS_LEGACY, DIFFUSERS_PEFT


def _suite(base, implementation):
    class Suite(base):
        @pytest.fixture(scope="session")
        def safemerge_impl(self):
            return implementation

    return Suite


TestLegacy = _suite(ConformanceSuite, DIFFUSERS_LEGACY)
TestLegacyLayers = _suite(LayerConformanceSuite, DIFFUSERS_LEGACY)
TestPeft = _suite(ConformanceSuite, DIFFUSERS_PEFT)
TestPeftLayers = _suite(LayerConformanceSuite, DIFFUSERS_PEFT)
"""

#: Cells where diffusers passes: the run selects them with the findings' cells.
PASSING = (
    "TestLegacy::test_fuse_is_accurate[bfloat16]",
    "TestLegacy::test_refusal_leaves_weight_unchanged[float32]",
    "TestLegacy::test_unfuse_round_trip[float16]",
    "TestLegacyLayers::test_fuse_layer_is_accurate[linear-float16]",
    "TestLegacyLayers::test_fuse_layer_keeps_form[conv2d-bfloat16]",
    "TestLegacyLayers::test_layer_refusal_leaves_layer_unchanged[conv2d-float32]",
    "TestLegacyLayers::test_unfuse_layer_round_trip[linear-float32]",
    "TestPeft::test_fuse_refuses_non_finite[float16]",
    "TestPeft::test_refusal_leaves_weight_unchanged[bfloat16]",
    "TestPeftLayers::test_fuse_layer_keeps_form[conv2d-bfloat16]",
    "TestPeftLayers::test_fuse_layer_leaves_adapters_unmodified[linear-float32]",
    "TestPeftLayers::test_layer_refusal_leaves_layer_unchanged[conv2d-float32]",
)
#: Cells outside an adapter's declarations: skipped, never run.
SKIPPED = (
    "TestLegacy::test_fuse_is_accurate[float8_e4m3fn]",
    "TestLegacyLayers::test_fuse_layer_is_accurate[conv1d-float32]",
    "TestPeftLayers::test_fuse_layer_is_accurate[embedding-float32]",
)


@dataclass(frozen=True)
class Finding:
    """A bug of diffusers' fuse (or of PEFT's, inherited) and the cells that show it.

    Attributes:
        name: what is wrong, in a few words.
        owner: whose code it is: "diffusers" or "PEFT".
        cells: the cells (``Class::test[id]`` of :data:`SUITE_MODULE`) that fail on it.
        shows: regular expressions the failure messages of those cells must match.
        reproduction: the standalone script, relative to ``benchmarks/``.
    """

    name: str
    owner: str
    cells: tuple[str, ...]
    shows: tuple[str, ...]
    reproduction: str


LEGACY_REFUSAL = "TestLegacy::test_fuse_refuses_non_finite[float16]"
LEGACY_LAYER_REFUSAL = "TestLegacyLayers::test_fuse_layer_refuses_non_finite[conv2d-bfloat16]"
FINDINGS = {
    "legacy Inf not refused": Finding(
        "the legacy safe fuse checks isnan only: an Inf adapter is fused",
        "diffusers",
        (LEGACY_REFUSAL, LEGACY_LAYER_REFUSAL),
        (
            r"\+inf: \[refusal\] fuse did not refuse a merge that is not finite in "
            r"torch\.float16 \(\+inf",
            r"\+inf: \[layer refusal\] fuse_layer did not refuse a merge that is not finite "
            r"\(\+inf: \+inf at adapters\[0\]\.lora_[AB].*conv2d layer",
        ),
        "diffusers_findings/legacy_inf_not_refused.py",
    ),
    "legacy cast overflow": Finding(
        "the legacy safe fuse checks the float32 sum and casts it unchecked",
        "diffusers",
        (LEGACY_REFUSAL, LEGACY_LAYER_REFUSAL),
        (
            r"cast-overflow: \[refusal\] fuse did not refuse a merge that is not finite in "
            r"torch\.float16",
            r"cast-overflow: \[layer refusal\] fuse_layer did not refuse a merge that is not "
            r"finite \(cast-overflow: .*beyond torch\.bfloat16's threshold",
        ),
        "diffusers_findings/legacy_cast_overflow.py",
    ),
    "delta in the adapter's dtype": Finding(
        "the delta is cast to a half-precision adapter's dtype: Inf past 65504",
        "PEFT",
        ("TestPeft::test_fuse_is_accurate[float32]",),
        (
            r"\[accuracy\] fuse refused a merge whose exact result fits torch\.float32 "
            r"\(largest \|exact\| 6[\d.]+\): ValueError: NaNs detected",
        ),
        "peft_findings/adapter_dtype_delta.py",
    ),
    "double rounding": Finding(
        "the delta is rounded to the weight's dtype before the add",
        "PEFT",
        ("TestPeft::test_fuse_is_accurate[bfloat16]",),
        (r"random: [^;]*\[accuracy\] the fused weight is not within its error bound",),
        "peft_findings/double_rounding.py",
    ),
    "lora_bias overflow": Finding(
        "the merged lora_bias is checked in float32 and cast unchecked",
        "PEFT",
        ("TestPeftLayers::test_fuse_layer_refuses_non_finite[linear-float16]",),
        (
            r"bias-overflow: [^;]*\[layer refusal\] fuse_layer did not refuse a merge that is "
            r"not finite \(bias-overflow: .*beyond float16; linear layer",
        ),
        "peft_findings/lora_bias_overflow.py",
    ),
}


@pytest.fixture(scope="module")
def suite_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The report's rows (``Class::test[id]`` -> row) of one pytest run of the findings'
    cells, :data:`PASSING` and :data:`SKIPPED`, in an empty directory."""
    cells = (
        {cell for finding in FINDINGS.values() for cell in finding.cells}
        | set(PASSING)
        | set(SKIPPED)
    )
    return run_cells(
        tmp_path_factory.mktemp("diffusers_under_the_suite"),
        MODULE,
        SUITE_MODULE,
        cells,
        flags=[f"--safemerge-examples={EXAMPLES}"],
    )


def _version(owner: str) -> str:
    return str((diffusers if owner == "diffusers" else peft).__version__)


def assert_finds(rows: dict[str, dict[str, Any]], key: str, finding: Finding) -> None:
    """The cells of ``finding`` failed and their messages show it; if not, say whether the
    owner fixed it or the suite lost its power over it."""
    __tracebackhide__ = True
    messages = "\n".join(str(rows.get(cell, {}).get("message", "")) for cell in finding.cells)
    failed = all(rows.get(cell, {}).get("result") == "failed" for cell in finding.cells)
    missing = [pattern for pattern in finding.shows if not re.search(pattern, messages)]
    if failed and not missing:
        return
    version = _version(finding.owner)
    if version != FINDINGS_VERSIONS[finding.owner]:
        pytest.fail(
            f"{finding.owner} {version} fixed finding {key!r} ({finding.name}; made on "
            f"{finding.owner} {FINDINGS_VERSIONS[finding.owner]}, reproduced by benchmarks/"
            f"{finding.reproduction}), or shows it otherwise: update FINDINGS in "
            f"{Path(__file__).name} and the README's table\n{messages}",
            pytrace=False,
        )
    pytest.fail(
        f"the suite no longer catches finding {key!r} ({finding.name}) in {finding.owner} "
        f"{version}: its cells {list(finding.cells)} did not report {missing}\n{messages}",
        pytrace=False,
    )


@pytest.mark.parametrize(
    "key", list(FINDINGS), ids=[re.sub(r"\W+", "-", key).strip("-") for key in FINDINGS]
)
def test_the_suite_finds(suite_rows: dict[str, dict[str, Any]], key: str) -> None:
    assert_finds(suite_rows, key, FINDINGS[key])


def test_exactly_the_findings_fail(suite_rows: dict[str, dict[str, Any]]) -> None:
    failed = {cell for cell, row in suite_rows.items() if row["result"] == "failed"}
    expected = {cell for finding in FINDINGS.values() for cell in finding.cells}
    assert failed == expected, {cell: suite_rows[cell]["message"] for cell in failed ^ expected}


def test_diffusers_passes_the_other_cells(suite_rows: dict[str, dict[str, Any]]) -> None:
    for cell in PASSING:
        assert suite_rows[cell]["result"] == "passed", f"{cell}: {suite_rows[cell]['message']}"
    # Each passing cell met its cases: a pass over nothing proves nothing.
    assert all(suite_rows[cell]["examples"] > 0 for cell in PASSING)


def test_undeclared_cells_are_skipped_with_the_reason(
    suite_rows: dict[str, dict[str, Any]],
) -> None:
    for cell in SKIPPED:
        row = suite_rows[cell]
        assert row["result"] == "skipped", f"{cell}: {row['result']}"
        assert "does not declare" in row["message"], f"{cell}: {row['message']}"


def test_every_finding_has_its_reproduction() -> None:
    for finding in FINDINGS.values():
        assert (BENCHMARKS / finding.reproduction).is_file(), finding.reproduction


def test_a_finding_that_does_not_show_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    finding = FINDINGS["legacy Inf not refused"]
    with pytest.raises(pytest.fail.Exception, match="the suite no longer catches finding"):
        assert_finds({}, "legacy Inf not refused", finding)
    monkeypatch.setattr(diffusers, "__version__", "99.0")
    with pytest.raises(
        pytest.fail.Exception, match=r"diffusers 99\.0 fixed finding 'legacy Inf not refused'"
    ):
        assert_finds({}, "legacy Inf not refused", finding)
