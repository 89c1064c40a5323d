"""The conformance suite finds PEFT's merge bugs, and passes what PEFT gets right.

One pytest run, in a subprocess from an empty directory, puts PEFT_LORA
(``safemerge.peft``) under the suites as a PEFT maintainer would, with no masking:
``ConformanceSuite`` and ``LayerConformanceSuite`` as they are (:data:`SUITE_MODULE`; one
more class declares linear layers with several adapters, to give that finding its
examples). The run selects each finding's cells and cells PEFT passes (:data:`PASSING`);
every cell is its own verdict, so one finding never hides another. Hypothesis runs
derandomized (its ``ci`` profile): the run is the same every time.

Exactly the cells of :data:`FINDINGS` fail, their messages naming the property, the kind
of case, the layer kind and the dtype of each finding; the others pass. A suite that
loses its power over a finding fails here. The findings were made on PEFT
:data:`FINDINGS_PEFT_VERSION`, each with a standalone reproduction in
``benchmarks/peft_findings/``; on another PEFT, a finding that no longer shows fails with
"PEFT <version> fixed finding ...": update :data:`FINDINGS` and the README's table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.suite_run import run_cells

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

FINDINGS_PEFT_VERSION = "0.21.2"
REPRODUCTIONS = Path(__file__).parents[2] / "benchmarks" / "peft_findings"
MODULE = "test_peft_under_the_suite.py"
#: Examples per property (shared among its cells, as in any run): enough for every
#: finding to show in its cells.
EXAMPLES = 300

SUITE_MODULE = """
import pytest

from pytest_safemerge.suite import ConformanceSuite, LayerConformanceSuite
from safemerge.peft import PEFT_LORA


class SeveralOnLinear:
    \"\"\"PEFT_LORA declaring linear layers with several adapters only: every case of its
    cells has 2 or 3 adapters.\"\"\"

    exact_unfuse = False
    layer_kinds = frozenset({"linear", "several"})

    def fuse(self, *args):
        return PEFT_LORA.fuse(*args)

    def fuse_layer(self, *args):
        return PEFT_LORA.fuse_layer(*args)

    def unfuse_layer(self, *args):
        return PEFT_LORA.unfuse_layer(*args)


class TestTensor(ConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_impl(self):
        return PEFT_LORA


class TestLayers(LayerConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_impl(self):
        return PEFT_LORA


class TestSeveral(LayerConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_impl(self):
        return SeveralOnLinear()
"""

#: Cells where PEFT passes: the run selects them with the findings' cells.
PASSING = (
    "TestTensor::test_fuse_leaves_adapters_unmodified[float32]",
    "TestTensor::test_fuse_refuses_non_finite[float16]",
    "TestTensor::test_refusal_leaves_weight_unchanged[bfloat16]",
    "TestTensor::test_unfuse_round_trip[float16]",
    "TestLayers::test_fuse_layer_leaves_adapters_unmodified[fan_in_fan_out-bfloat16]",
    "TestLayers::test_fuse_layer_keeps_form[conv2d-float32]",
    "TestLayers::test_unfuse_layer_round_trip[linear-float32]",
)


@dataclass(frozen=True)
class Finding:
    """A bug (or limitation) of PEFT's merge and the cells of the suite that show it.

    Attributes:
        name: what is wrong, in a few words.
        cells: the cells (``Class::test[id]`` of :data:`SUITE_MODULE`) that fail on it.
        shows: regular expressions the failure messages of those cells must match
            (together): the property, the kind of case, the layer kind and dtype.
        reproduction: the standalone script in ``benchmarks/peft_findings/``.
    """

    name: str
    cells: tuple[str, ...]
    shows: tuple[str, ...]
    reproduction: str


ACCURATE_FLOAT16 = "TestTensor::test_fuse_is_accurate[float16]"
FINDINGS = {
    "float8 weights": Finding(
        "no merge into a float8 weight (torch has no float8 add): a limitation",
        (
            "TestTensor::test_fuse_is_accurate[float8_e4m3fn]",
            "TestTensor::test_fuse_refuses_non_finite[float8_e5m2]",
        ),
        (
            r"\[accuracy\] crashed on a case whose merge is finite .*NotImplementedError: "
            r'"add_stub" not implemented for .Float8_e4m3fn.',
            r"\[refusal\] refused by crashing: NotImplementedError: \"add_stub\"",
        ),
        "float8_weights.py",
    ),
    "double rounding": Finding(
        "the delta is rounded to the weight's dtype before the add",
        (ACCURATE_FLOAT16,),
        (r"random: [^;]*\[accuracy\] the fused weight is not within its error bound",),
        "double_rounding.py",
    ),
    "double rounding in unmerge": Finding(
        "the delta is rounded to the weight's dtype before the subtraction",
        ("TestTensor::test_stacked_fuses_unfuse_in_reverse[bfloat16]",),
        (r"\[stacked round trip\] unfusing the second adapter: the weight is not within",),
        "double_rounding.py",
    ),
    "delta overflow refused": Finding(
        "a finite merge is refused when the delta alone is beyond the weight's dtype",
        (ACCURATE_FLOAT16,),
        (
            r"delta-overflow: [^;]*\[accuracy\] fuse refused a merge whose exact result fits "
            r"torch\.float16 \(largest \|exact\| [\d.e+]+\): ValueError: NaNs detected",
        ),
        "delta_overflow_refused.py",
    ),
    "delta in the adapter's dtype": Finding(
        "the delta is cast to a half-precision adapter's dtype: rounded, or Inf past 65504",
        (
            "TestTensor::test_fuse_is_accurate[float32]",
            "TestLayers::test_fuse_layer_is_accurate[linear-float32]",
        ),
        (
            r"random: [^;]*\[accuracy\] the fused weight is not within its error bound",
            # a delta past 65504, Inf once cast to float16: a finite merge refused
            r"\[accuracy\] fuse refused a merge whose exact result fits torch\.float32 "
            r"\(largest \|exact\| 6[\d.]+\): ValueError: NaNs detected",
            r"\[layer accuracy\] after fuse_layer, the weight of the linear layer, .* is not "
            r"within its error bound",
        ),
        "adapter_dtype_delta.py",
    ),
    "lora_bias overflow": Finding(
        "the merged lora_bias is checked in float32 and cast to float16 unchecked",
        ("TestLayers::test_fuse_layer_refuses_non_finite[linear-float16]",),
        (
            r"bias-overflow: [^;]*\[layer refusal\] fuse_layer did not refuse a merge that is not "
            r"finite \(bias-overflow: .*beyond float16; linear layer, .*lora-bias",
        ),
        "lora_bias_overflow.py",
    ),
    "several adapters not atomic": Finding(
        "a refused adapter leaves the adapters merged before it in the weight",
        (
            "TestSeveral::test_layer_refusal_leaves_layer_unchanged[linear-float16]",
            # Where the derandomized run draws several adapters in a cast-overflow case.
            "TestLayers::test_layer_refusal_leaves_layer_unchanged[linear-float32]",
        ),
        (
            r"\[layer atomicity\] fuse_layer refused \(ValueError: NaNs detected in the merged "
            r"weights\. The adapter adapter_[1-9] seems to be broken\) but changed the linear "
            r"layer, [23] adapters, .*several",
        ),
        "several_adapters_not_atomic.py",
    ),
    "bnb lora_bias safe merge": Finding(
        "bnb: the lora_bias check lacks .all() (a crash) and runs after the weight was replaced",
        (
            "TestLayers::test_layer_refusal_leaves_layer_unchanged[nf4]",
            "TestLayers::test_fuse_layer_refuses_non_finite[int8]",
        ),
        (
            r"\[layer atomicity\] fuse_layer crashed, refusing by crashing \(RuntimeError: "
            r"Boolean value of Tensor with more than one value is ambiguous\) but changed the "
            r"nf4 layer",
            r"\[layer refusal\] refused by crashing: RuntimeError: Boolean value of Tensor",
        ),
        "bnb_lora_bias_safe_merge.py",
    ),
    "bnb lora_bias unscaled": Finding(
        "bnb: the lora_bias is merged without the adapter's scaling",
        ("TestLayers::test_fuse_layer_is_accurate[nf4]",),
        (
            r"\[layer accuracy\] after fuse_layer, the bias of the nf4 layer, 1 adapter, "
            r"lora-bias, .* is not within its error bound",
        ),
        "bnb_lora_bias_unscaled.py",
    ),
    "bnb int8 through float16": Finding(
        "bnb int8: the float32 sum is checked, its float16 cast (Int8Params) is not",
        ("TestLayers::test_fuse_layer_refuses_non_finite[int8]",),
        (
            r"cast-overflow: [^;]*\[layer refusal\] fuse_layer did not refuse a merge that is not "
            r"finite \(cast-overflow: .*finite in float32, beyond float16; int8 layer",
        ),
        "bnb_int8_fp16_overflow.py",
    ),
    "conv3d pointwise": Finding(
        "Conv3d kernels (1, 1, k) take the Conv2d 1x1 shortcut and fail",
        ("TestLayers::test_fuse_layer_is_accurate[conv3d-float32]",),
        (
            r"\[layer accuracy\] crashed on a case whose merge is finite \(random case, conv3d "
            r"layer, .*RuntimeError: output with shape \[[\d, ]+\] doesn't match the broadcast "
            r"shape",
        ),
        "conv3d_pointwise.py",
    ),
}


def _bitsandbytes_misreads_straddling_blocks() -> bool:
    """Whether this machine's bitsandbytes CPU dequantize_4bit has the straddling-block bug
    (its reproduction exits 1 while the bug is there; some CPU kernels get it right)."""
    done = subprocess.run(
        [sys.executable, str(REPRODUCTIONS / "bnb_cpu_dequantize_4bit.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.returncode == 1


#: Not PEFT's: bitsandbytes' CPU dequantize_4bit misreads blocks that straddle rows, and
#: PEFT's 4-bit merge writes the misread values back. Expected only where it shows.
DEQUANTIZE_4BIT = Finding(
    "bitsandbytes' CPU dequantize_4bit misreads blocks that straddle rows (not PEFT's)",
    ("TestLayers::test_fuse_layer_is_accurate[nf4]",),
    (
        r"\[layer accuracy\] after fuse_layer, the dequantized weight of the nf4 layer, .* is "
        r"not within its error bound",
    ),
    "bnb_cpu_dequantize_4bit.py",
)


@pytest.fixture(scope="module")
def suite_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The report's rows (``Class::test[id]`` -> row) of one pytest run of the findings'
    cells and :data:`PASSING` from :data:`SUITE_MODULE`, in an empty directory."""
    cells = {cell for finding in FINDINGS.values() for cell in finding.cells} | set(PASSING)
    return run_cells(
        tmp_path_factory.mktemp("peft_under_the_suite"),
        MODULE,
        SUITE_MODULE,
        cells,
        flags=[f"--safemerge-examples={EXAMPLES}"],
        timeout=1200,
    )


def assert_finds(rows: dict[str, dict[str, Any]], key: str, finding: Finding) -> None:
    """The cells of ``finding`` failed and their messages show it; if not, say whether PEFT
    fixed it or the suite lost its power over it."""
    __tracebackhide__ = True
    messages = "\n".join(str(rows.get(cell, {}).get("message", "")) for cell in finding.cells)
    failed = all(rows.get(cell, {}).get("result") == "failed" for cell in finding.cells)
    missing = [pattern for pattern in finding.shows if not re.search(pattern, messages)]
    if failed and not missing:
        return
    if peft.__version__ != FINDINGS_PEFT_VERSION:
        pytest.fail(
            f"PEFT {peft.__version__} fixed finding {key!r} ({finding.name}; made on PEFT "
            f"{FINDINGS_PEFT_VERSION}, reproduced by benchmarks/peft_findings/"
            f"{finding.reproduction}), or shows it otherwise: update FINDINGS in "
            f"{Path(__file__).name} and the README's table\n{messages}",
            pytrace=False,
        )
    pytest.fail(
        f"the suite no longer catches finding {key!r} ({finding.name}) in PEFT "
        f"{peft.__version__}: its cells {list(finding.cells)} did not report {missing}\n"
        f"{messages}",
        pytrace=False,
    )


@pytest.mark.parametrize(
    "key", list(FINDINGS), ids=[re.sub(r"\W+", "-", key).strip("-") for key in FINDINGS]
)
def test_the_suite_finds(suite_rows: dict[str, dict[str, Any]], key: str) -> None:
    assert_finds(suite_rows, key, FINDINGS[key])


def test_the_suite_finds_bitsandbytes_dequantize_where_it_shows(
    suite_rows: dict[str, dict[str, Any]],
) -> None:
    if not _bitsandbytes_misreads_straddling_blocks():
        pytest.skip(
            "this machine's bitsandbytes CPU dequantize_4bit reads blocks that straddle rows "
            "correctly (benchmarks/peft_findings/bnb_cpu_dequantize_4bit.py exits 0)"
        )
    assert_finds(suite_rows, "bnb 4-bit dequantize", DEQUANTIZE_4BIT)


def test_exactly_the_findings_fail(suite_rows: dict[str, dict[str, Any]]) -> None:
    failed = {cell for cell, row in suite_rows.items() if row["result"] == "failed"}
    expected = {cell for finding in FINDINGS.values() for cell in finding.cells}
    assert failed == expected, {cell: suite_rows[cell]["message"] for cell in failed ^ expected}


def test_peft_passes_the_other_cells(suite_rows: dict[str, dict[str, Any]]) -> None:
    for cell in PASSING:
        assert suite_rows[cell]["result"] == "passed", f"{cell}: {suite_rows[cell]['message']}"
    # Each passing cell met its cases: a pass over nothing proves nothing.
    assert all(suite_rows[cell]["examples"] > 0 for cell in PASSING)


def test_every_finding_has_its_reproduction() -> None:
    for finding in [*FINDINGS.values(), DEQUANTIZE_4BIT]:
        assert (REPRODUCTIONS / finding.reproduction).is_file(), finding.reproduction


def test_a_finding_that_does_not_show_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    finding = FINDINGS["lora_bias overflow"]
    with pytest.raises(pytest.fail.Exception, match="the suite no longer catches finding"):
        assert_finds({}, "lora_bias overflow", finding)
    monkeypatch.setattr(peft, "__version__", "99.0")
    with pytest.raises(
        pytest.fail.Exception, match=r"PEFT 99\.0 fixed finding 'lora_bias overflow'"
    ):
        assert_finds({}, "lora_bias overflow", finding)
