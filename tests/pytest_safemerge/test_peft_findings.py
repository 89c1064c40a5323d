"""The conformance suite finds PEFT's merge bugs, and passes what PEFT gets right.

One pytest run, in a subprocess from an empty directory, puts PEFT_LORA
(``safemerge.peft``) under the suites as a PEFT maintainer would: subclasses of
``ConformanceSuite`` and ``LayerConformanceSuite`` (:data:`SUITE_MODULE`). A property stops
at its first failing cell (kind of case x layer kind x option), so each module-level
class has PEFT_LORA declare only the layer kinds of its findings (``layer_kinds``, the
suite's own way to choose what it explores). Hypothesis runs derandomized (its ``ci``
profile): the run is the same every time.

Exactly the properties of :data:`FINDINGS` (and one known false positive of the suite)
fail, each report naming the case kinds of its finding; the others pass. A suite that
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

import pytest

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

FINDINGS_PEFT_VERSION = "0.21.2"
REPRODUCTIONS = Path(__file__).parents[2] / "benchmarks" / "peft_findings"
MODULE = "test_peft_under_the_suite.py"

SUITE_MODULE = '''
"""PEFT_LORA under safemerge's suites: the tensor contract as it is (and beyond float8),
the module-level contract on chosen layer kinds (each class declares its own)."""

import pytest
import torch

import safemerge
from pytest_safemerge.suite import ConformanceSuite, LayerConformanceSuite
from safemerge.peft import PEFT_LORA


class Declaring:
    """PEFT_LORA, declaring only some of the layer kinds it takes."""

    exact_unfuse = False

    def __init__(self, kinds):
        self.layer_kinds = frozenset(kinds)

    def fuse(self, *args):
        return PEFT_LORA.fuse(*args)

    def unfuse(self, *args):
        return PEFT_LORA.unfuse(*args)

    def fuse_layer(self, *args):
        return PEFT_LORA.fuse_layer(*args)

    def unfuse_layer(self, *args):
        return PEFT_LORA.unfuse_layer(*args)


class Float8BySafemerge:
    """PEFT_LORA, with the float8 weights PEFT cannot merge into fused by safemerge, so
    that the accuracy property goes on to the dtypes PEFT does merge."""

    exact_unfuse = False

    def fuse(self, weight, lora_A, lora_B, scale):
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            adapter = safemerge.LoraAdapter(lora_A, lora_B)
            safemerge.fuse_weight(weight, adapter, scale=scale, exact_unfuse=False)
            return None
        return PEFT_LORA.fuse(weight, lora_A, lora_B, scale)


def declaring(*kinds):
    @pytest.fixture(scope="session")
    def safemerge_impl(self):
        return Declaring(kinds)

    return safemerge_impl


class TestTensorAsIs(ConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_impl(self):
        return PEFT_LORA


class TestTensorBeyondFloat8(ConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_impl(self):
        return Float8BySafemerge()


class TestLinear(LayerConformanceSuite):
    safemerge_impl = declaring("linear", "lora-bias", "several")


class TestFourBit(LayerConformanceSuite):
    safemerge_impl = declaring("nf4", "lora-bias")


class TestInt8LoraBias(LayerConformanceSuite):
    safemerge_impl = declaring("int8", "lora-bias")


class TestInt8Plain(LayerConformanceSuite):
    safemerge_impl = declaring("int8")


class TestConv3d(LayerConformanceSuite):
    safemerge_impl = declaring("conv3d")


class TestConforming(LayerConformanceSuite):
    safemerge_impl = declaring(
        "linear", "embedding", "conv1d", "conv2d", "fan_in_fan_out", "several", "int8"
    )
'''

TENSOR_PROPERTIES = (
    "test_fuse_is_accurate",
    "test_fuse_keeps_form",
    "test_fuse_leaves_adapters_unmodified",
    "test_fuse_refuses_non_finite",
    "test_refusal_leaves_weight_unchanged",
    "test_fuse_refuses_non_finite_in_large_weights",
    "test_unfuse_round_trip",
    "test_stacked_fuses_unfuse_in_reverse",
    "test_in_place_agrees_with_returned",
)
#: What the run selects: class -> properties (``None``: all of them).
SELECTED: dict[str, tuple[str, ...] | None] = {
    "TestTensorAsIs": None,
    "TestTensorBeyondFloat8": ("test_fuse_is_accurate",),
    "TestLinear": (
        "test_fuse_layer_is_accurate",
        "test_fuse_layer_refuses_non_finite",
        "test_layer_refusal_leaves_layer_unchanged",
    ),
    "TestFourBit": ("test_fuse_layer_is_accurate", "test_layer_refusal_leaves_layer_unchanged"),
    "TestInt8LoraBias": (
        "test_fuse_layer_is_accurate",
        "test_fuse_layer_keeps_form",
        "test_fuse_layer_refuses_non_finite",
    ),
    "TestInt8Plain": ("test_layer_refusal_leaves_layer_unchanged",),
    "TestConv3d": ("test_fuse_layer_is_accurate",),
    "TestConforming": (
        "test_fuse_layer_keeps_form",
        "test_fuse_layer_leaves_adapters_unmodified",
        "test_unfuse_layer_round_trip",
    ),
}
#: A failure of the suite, not of PEFT (see :data:`SUITE_FALSE_POSITIVE_WHY`).
SUITE_FALSE_POSITIVE = "TestInt8Plain::test_layer_refusal_leaves_layer_unchanged"
SUITE_FALSE_POSITIVE_WHY = (
    "a suite false positive: PEFT's Linear8bitLt.merge sets layer.state.SCB = weight.SCB (an "
    "alias of the same row scales, as bitsandbytes' own forward does) before it refuses, and "
    "the atomicity property counts the alias appearing as a change"
)


@dataclass(frozen=True)
class Finding:
    """A bug (or limitation) of PEFT's merge and how the suite shows it.

    Attributes:
        name: what is wrong, in a few words.
        where: the class of :data:`SUITE_MODULE` and the property (test) that fails on it.
        shows: regular expressions its failure report must match (the property's
            message, the case kind, the layer kind, options and dtype).
        reproduction: the standalone script in ``benchmarks/peft_findings/``.
    """

    name: str
    where: str
    shows: tuple[str, ...]
    reproduction: str


FINDINGS = {
    # The tensor contract.
    "float8 weights": Finding(
        "no merge into a float8 weight (torch has no float8 add): a limitation",
        "TestTensorAsIs::test_fuse_is_accurate",
        (
            r"\[accuracy\] fuse refused a merge whose exact result fits torch\.float8_e(4m3fn|5m2)",
            r'NotImplementedError: "add_stub" not implemented',
            r"case kind 'random'",
        ),
        "float8_weights.py",
    ),
    "double rounding": Finding(
        "the delta is rounded to the weight's dtype before the add",
        "TestTensorBeyondFloat8::test_fuse_is_accurate",
        (
            r"\[accuracy\] the fused weight is not within its error bound",
            r"case kind 'random'",
            r"weight \(\d+, \d+\) torch\.(float16|bfloat16)",
        ),
        "double_rounding.py",
    ),
    "double rounding in unmerge": Finding(
        "the delta is rounded to the weight's dtype before the subtraction",
        "TestTensorAsIs::test_stacked_fuses_unfuse_in_reverse",
        (
            r"\[stacked round trip\] unfusing the second adapter: the weight is not within",
            r"weight \(\d+, \d+\) torch\.(float16|bfloat16)",
        ),
        "double_rounding.py",
    ),
    # The module-level contract.
    "double rounding in layers": Finding(
        "the delta is rounded to the weight's dtype before the add (every layer kind)",
        "TestLinear::test_fuse_layer_is_accurate",
        (
            r"\[layer accuracy\] after fuse_layer, the weight of the linear layer, .* is not "
            r"within its error bound",
            r"case kind 'random'",
            r"linear Linear weight \(\d+, \d+\) (float16|bfloat16)",
        ),
        "double_rounding.py",
    ),
    "lora_bias overflow": Finding(
        "the merged lora_bias is checked in float32 and cast to float16 unchecked",
        "TestLinear::test_fuse_layer_refuses_non_finite",
        (
            r"\[layer refusal\] fuse_layer did not refuse a merge that is not finite "
            r"\(bias-overflow: .*beyond float16; linear layer, .*lora-bias",
            r"case kind 'bias-overflow'",
        ),
        "lora_bias_overflow.py",
    ),
    "several adapters not atomic": Finding(
        "a refused adapter leaves the adapters merged before it in the weight",
        "TestLinear::test_layer_refusal_leaves_layer_unchanged",
        (
            r"\[layer atomicity\] fuse_layer refused \(ValueError: NaNs detected in the merged "
            r"weights\. The adapter adapter_[1-9] seems to be broken\) but changed the linear "
            r"layer, [23] adapters, .*several",
            r"weight: \d+ of \d+ bytes changed",
        ),
        "several_adapters_not_atomic.py",
    ),
    "bnb 4-bit dequantize (bitsandbytes)": Finding(
        "bitsandbytes' CPU dequantize_4bit misreads blocks that straddle rows (not PEFT's)",
        "TestFourBit::test_fuse_layer_is_accurate",
        (
            r"\[layer accuracy\] after fuse_layer, the dequantized weight of the nf4 layer, "
            r".* is not within its error bound",
            r"nf4 Linear4bit \(\d+, \d+\) \(blocksize (32|64)",
        ),
        "bnb_cpu_dequantize_4bit.py",
    ),
    "bnb lora_bias safe merge": Finding(
        "bnb: the lora_bias check lacks .all() and runs after the weight was replaced",
        "TestFourBit::test_layer_refusal_leaves_layer_unchanged",
        (
            r"\[layer atomicity\] fuse_layer refused \(RuntimeError: Boolean value of Tensor "
            r"with more than one value is ambiguous\) but changed the nf4 layer, .*lora-bias",
            r"weight\S*: \d+ of \d+ bytes changed",
        ),
        "bnb_lora_bias_safe_merge.py",
    ),
    "bnb lora_bias unscaled": Finding(
        "bnb: the lora_bias is merged without the adapter's scaling",
        "TestInt8LoraBias::test_fuse_layer_is_accurate",
        (
            r"\[layer accuracy\] after fuse_layer, the bias of the int8 layer, 1 adapter, "
            r"lora-bias, .* is not within its error bound",
            r"alpha [\d.]+ scale (?!1 )[\d.]+ lora_bias",  # unscaled is wrong only here
        ),
        "bnb_lora_bias_unscaled.py",
    ),
    "bnb lora_bias dtype": Finding(
        "bnb: a float16 bias becomes float32 when the lora_bias is merged",
        "TestInt8LoraBias::test_fuse_layer_keeps_form",
        (
            r"\[layer form\] after fuse_layer, the int8 layer, 1 adapter, lora-bias, .* changed form",
            r"bias: \(\(\d+,\), torch\.float16, .*\) -> \(\(\d+,\), torch\.float32",
        ),
        "bnb_lora_bias_dtype.py",
    ),
    "bnb int8 through float16": Finding(
        "bnb int8: the float32 sum is checked, its float16 cast (Int8Params) is not",
        "TestInt8LoraBias::test_fuse_layer_refuses_non_finite",
        (
            r"\[layer refusal\] fuse_layer did not refuse a merge that is not finite "
            r"\(cast-overflow: .*finite in float32, beyond float16; int8 layer",
            r"case kind 'cast-overflow'",
        ),
        "bnb_int8_fp16_overflow.py",
    ),
    "conv3d pointwise": Finding(
        "Conv3d kernels (1, 1, k) take the Conv2d 1x1 shortcut and fail (or, with DoRA, "
        "change the weight's shape)",
        "TestConv3d::test_fuse_layer_is_accurate",
        (
            r"\[layer accuracy\] fuse_layer refused a merge whose result fits its dtypes "
            r"\(conv3d layer, .*\): RuntimeError: output with shape \[[\d, ]+\] doesn't match "
            r"the broadcast shape",
            r"conv3d Conv3d weight \(\d+, \d+, 1, 1, \d+\)",
        ),
        "conv3d_pointwise.py",
    ),
}


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The output of one pytest run of :data:`SUITE_MODULE`, from an empty directory."""
    directory = tmp_path_factory.mktemp("peft_under_the_suite")
    (directory / MODULE).write_text(SUITE_MODULE)
    selection = " or ".join(
        cls if tests is None else f"({cls} and ({' or '.join(tests)}))"
        for cls, tests in SELECTED.items()
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        MODULE,
        "-p",
        "no:cacheprovider",
        "--hypothesis-profile=ci",
        "--safemerge-examples=100",
        "-rA",
        "-k",
        selection,
    ]
    done = subprocess.run(
        command, cwd=directory, capture_output=True, text=True, timeout=600, check=False
    )
    return done.stdout + done.stderr


def _outcomes(output: str) -> dict[str, str]:
    """``Class::test`` -> PASSED, FAILED or SKIPPED, from the ``-rA`` summary."""
    found = re.findall(rf"^(PASSED|FAILED|SKIPPED|ERROR) {MODULE}::(\w+::\w+)", output, re.M)
    return {name: outcome for outcome, name in found}


def _report_of(output: str, where: str) -> str:
    """The failure report of ``Class::test`` (from its header line to the next section)."""
    cls, test = where.split("::")
    match = re.search(
        rf"_{{3,}} {cls}\.{test} _{{3,}}\n(.*?)(?=\n_{{3,}} |\n={{3,}} )", output, re.DOTALL
    )
    return match.group(1) if match else ""


def assert_finds(output: str, key: str) -> None:
    """The run's report shows finding ``key``; if not, say whether PEFT fixed it or the
    suite lost its power over it."""
    __tracebackhide__ = True
    finding = FINDINGS[key]
    report = _report_of(output, finding.where)
    missing = [pattern for pattern in finding.shows if not re.search(pattern, report)]
    if not missing:
        return
    if peft.__version__ != FINDINGS_PEFT_VERSION:
        pytest.fail(
            f"PEFT {peft.__version__} fixed finding {key!r} ({finding.name}; made on PEFT "
            f"{FINDINGS_PEFT_VERSION}, reproduced by benchmarks/peft_findings/"
            f"{finding.reproduction}), or shows it otherwise: update FINDINGS in "
            f"{Path(__file__).name} and the README's table\n{report or output}",
            pytrace=False,
        )
    pytest.fail(
        f"the suite no longer catches finding {key!r} ({finding.name}) in PEFT "
        f"{peft.__version__}: {finding.where} did not report {missing}\n{report or output}",
        pytrace=False,
    )


@pytest.mark.parametrize(
    "key", list(FINDINGS), ids=[re.sub(r"\W+", "-", key).strip("-") for key in FINDINGS]
)
def test_the_suite_finds(suite_run: str, key: str) -> None:
    assert_finds(suite_run, key)


def test_exactly_the_findings_fail(suite_run: str) -> None:
    outcomes = _outcomes(suite_run)
    failed = {name for name, outcome in outcomes.items() if outcome == "FAILED"}
    expected = {finding.where for finding in FINDINGS.values()} | {SUITE_FALSE_POSITIVE}
    assert failed == expected, suite_run
    assert "ERROR" not in outcomes.values(), suite_run


def test_peft_passes_the_other_properties(suite_run: str) -> None:
    outcomes = _outcomes(suite_run)
    tensor = {f"TestTensorAsIs::{test}" for test in TENSOR_PROPERTIES}
    conforming = {f"TestConforming::{test}" for test in SELECTED["TestConforming"] or ()}
    failing = {finding.where for finding in FINDINGS.values()}
    for name in (tensor - failing) | conforming:
        assert outcomes.get(name) == "PASSED", f"{name}: {outcomes.get(name)}\n{suite_run}"


def test_int8_refusal_leaves_the_layer_unchanged(suite_run: str) -> None:
    assert _outcomes(suite_run).get(SUITE_FALSE_POSITIVE) == "PASSED", _report_of(
        suite_run, SUITE_FALSE_POSITIVE
    )


def test_every_finding_has_its_reproduction() -> None:
    for finding in FINDINGS.values():
        assert (REPRODUCTIONS / finding.reproduction).is_file(), finding.reproduction


def test_a_finding_that_does_not_show_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pytest.fail.Exception, match="the suite no longer catches finding"):
        assert_finds("", "lora_bias overflow")
    monkeypatch.setattr(peft, "__version__", "99.0")
    with pytest.raises(
        pytest.fail.Exception, match=r"PEFT 99\.0 fixed finding 'lora_bias overflow'"
    ):
        assert_finds("", "lora_bias overflow")
