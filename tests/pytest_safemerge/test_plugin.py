"""The plugin driven through pytester: options and ini keys, the suite in an empty
directory, overriding the implementation, the model suite, the report, pytest-xdist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bitsandbytes  # noqa: F401  (see below)
import pytest
import torch

import safemerge
import safemerge.io.atomic
import safemerge.io.checkpoint
from pytest_safemerge.options import OPTIONS
from pytest_safemerge.suite.layer_contract import LAYER_DTYPES
from safemerge import names, synthetic

# bitsandbytes is imported above, once: pytester's in-process runs forget the modules they
# import, and bitsandbytes cannot register its torch operators a second time.

PROPERTIES = (
    "accuracy",
    "form",
    "adapters unmodified",
    "refusal",
    "atomicity",
    "round trip",
    "stacked round trip",
    "refusal in large weights",
    "in-place agreement",
)
#: The layer suite's properties: collected with the tensor suite for an implementation
#: with fuse_layer, as safemerge's engine has.
LAYER_PROPERTIES = (
    "layer accuracy",
    "layer form",
    "layer adapters unmodified",
    "layer refusal",
    "layer atomicity",
    "layer round trip",
)
EVERY_PROPERTY = (*PROPERTIES, *LAYER_PROPERTIES)
#: The cells: each tensor property on each weight dtype, each layer property on each layer
#: kind (unquantized ones in three dtypes).
TENSOR_CELLS = len(PROPERTIES) * len(names.WEIGHT_DTYPES)
LAYER_CELLS = len(LAYER_PROPERTIES) * (
    len(names.UNQUANTIZED_KINDS) * len(LAYER_DTYPES) + len(names.QUANT_TYPES)
)
EVERY_CELL = TENSOR_CELLS + LAYER_CELLS
FAST = "--safemerge-examples=10"  # the floor per kind of case still runs every kind

HALF_PRECISION_IMPL = '''
import torch

class HalfPrecision:
    """Computes the delta in float16, as merge code did when it cast the factors to the
    weight's dtype first; guards the cast result properly."""

    def fuse(self, weight, lora_A, lora_B, scale):
        delta = (lora_B.half() @ lora_A.half()).float() * scale
        merged32 = weight.float() + delta
        merged = merged32.to(weight.dtype)
        saturated = weight.dtype == torch.float8_e4m3fn and bool((merged32.abs() >= 464).any())
        if saturated or not torch.isfinite(merged.float()).all():
            raise ValueError("not finite")
        weight.copy_(merged)

HALF = HalfPrecision()
'''


#: The keys every row of the JSON report has (README, "Options, report, xdist").
ROW_KEYS = {
    "contract",
    "property",
    "dtype",
    "kind",
    "result",
    "examples",
    "worst_fraction",
    "message",
}


def rows_of(path: Path) -> dict[tuple[object, ...], dict[str, Any]]:
    """The report's rows by cell: (contract, property, kind, dtype)."""
    document = json.loads(path.read_text())
    rows = document["results"]
    assert all(set(row) >= ROW_KEYS for row in rows)
    return {(r["contract"], r["property"], r["kind"], r["dtype"]): r for r in rows}


def test_every_option_has_an_ini_key_and_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    for option in OPTIONS:
        result.stdout.fnmatch_lines([f"*{option.flag}*"])
        result.stdout.fnmatch_lines([f"*{option.ini} *"])


def test_without_its_options_the_plugin_adds_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_own(): pass")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "safemerge" not in result.stdout.str().split("plugins:")[-1].split("\n", 1)[-1]


def test_the_suite_runs_in_an_empty_directory_against_safemerge(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--safemerge-suite", FAST, "--safemerge-report=report.json")
    result.assert_outcomes(passed=EVERY_CELL)
    result.stdout.fnmatch_lines(
        [
            "*implementation under test pytest_safemerge.implementations:SAFEMERGE; layer suite "
            "collected*",
            "*= safemerge =*",
            "tensor contract (pytest_safemerge.implementations:SAFEMERGE; * examples):",
            "*float32*float16*bfloat16*float8_e4m3fn*float8_e5m2",
            "  accuracy  *ok*ok*ok*ok*ok",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "layer contract (pytest_safemerge.implementations:SAFEMERGE; * examples):",
            "*accuracy*adapters unmodified*atomicity*form*refusal*round trip",
            "  linear/float32 *ok*ok*ok*ok*ok*ok",
            "  nf4 *ok*ok*ok*ok*ok*ok",
        ]
    )
    rows = rows_of(pytester.path / "report.json")
    assert len(rows) == EVERY_CELL
    assert {row["result"] for row in rows.values()} == {"passed"}
    assert {(c, p) for c, p, _, _ in rows} == {("tensor", p) for p in PROPERTIES} | {
        ("layer", p) for p in LAYER_PROPERTIES
    }
    # Every cell explored what it is about: on float16, every kind of refusal.
    refusal = rows[("tensor", "refusal", None, "float16")]
    assert set(refusal["kinds"]) == {"nan", "+inf", "-inf", "cast-overflow"}
    assert set(rows[("tensor", "refusal", None, "float32")]["kinds"]) == {"nan", "+inf", "-inf"}
    for dtype in names.WEIGHT_DTYPES:
        accuracy = rows[("tensor", "accuracy", None, dtype)]
        assert (
            isinstance(accuracy["worst_fraction"], float) and 0 <= accuracy["worst_fraction"] <= 1
        )
        assert rows[("tensor", "round trip", None, dtype)]["worst_fraction"] == 0.0  # exact
    assert rows[("layer", "layer accuracy", "nf4", None)]["examples"] > 0


def test_ini_keys_set_the_options_and_the_command_line_wins(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsafemerge_suite = true\nsafemerge_examples = 5\n")
    pytester.makepyfile(
        "def test_examples(request):\n"
        "    from pytest_safemerge.options import SETTINGS_KEY\n"
        "    assert request.config.stash[SETTINGS_KEY].examples == 41\n"
    )
    result = pytester.runpytest("--safemerge-examples=41", "-k", "examples")
    result.assert_outcomes(passed=1, deselected=EVERY_CELL)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--safemerge-impl=no_such_module:MERGE", "*cannot import module 'no_such_module'*"),
        ("--safemerge-impl=os:sep", "*has no callable fuse(weight, lora_A, lora_B, scale)*"),
        ("--safemerge-impl=os.path", "*expected MODULE:OBJECT*"),
        ("--safemerge-examples=-3", "*--safemerge-examples='-3': expected a non-negative int*"),
        ("--safemerge-quant=int4", "*choose one of nf4, fp4, int8*"),
        (
            "--safemerge-dtypes=float32,float64",
            "*--safemerge-dtypes='float32,float64': unknown dtypes ?'float64'?; choose among "
            "float32, float16, bfloat16, float8_e4m3fn, float8_e5m2*",
        ),
        ("--safemerge-model=missing_dir", "*--safemerge-model=missing_dir*"),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, argument: str, message: str
) -> None:
    result = pytester.runpytest(argument)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_buggy_implementation_fails_with_a_shrunk_example(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(half_merge=HALF_PRECISION_IMPL)
    pytester.syspathinsert()
    result = pytester.runpytest("--safemerge-impl=half_merge:HALF", FAST)
    # The float16 product loses accuracy (and, depending on the examples drawn, a factor
    # underflowing in float16 also hides a sum that overflows: refusal may fail too).
    outcomes = result.parseoutcomes()
    # No unfuse: the round-trip cells are skipped, on every dtype.
    assert outcomes.get("failed", 0) >= 1 and outcomes.get("skipped") == 2 * 5
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: [[]accuracy[]] the fused weight is not within its error bound.",
            "*Mismatched elements: * / * (*%)",
            "*Greatest error as a fraction of its bound: * at index (*",
            "*Failing test case: test_fuse_is_accurate__float32__*(*",
            "  accuracy  *FAILED *",
            "  round trip  *skip*skip*skip*skip*skip",
            "failed cells:",
            "  tensor accuracy [[]float32[]]: random: [[]accuracy[]] the fused weight is not within*",
        ]
    )


def test_a_subclass_or_a_conftest_fixture_selects_the_implementation(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(half_merge=HALF_PRECISION_IMPL)
    pytester.syspathinsert()
    pytester.makeconftest(
        "import pytest, half_merge\n"
        "@pytest.fixture(scope='session')\n"
        "def safemerge_impl():\n"
        "    return half_merge.HALF\n"
    )
    pytester.makepyfile(
        test_ours=(
            "import pytest\n"
            "from pytest_safemerge.implementations import SAFEMERGE\n"
            "from pytest_safemerge.suite import ConformanceSuite\n"
            "class TestHalf(ConformanceSuite):\n"
            "    pass\n"
            "class TestOurs(ConformanceSuite):\n"
            "    @pytest.fixture(scope='session')\n"
            "    def safemerge_impl(self):\n"
            "        return SAFEMERGE\n"
        )
    )
    result = pytester.runpytest(FAST, "-k", "accurate and float32")
    result.assert_outcomes(passed=1, failed=1, deselected=2 * TENSOR_CELLS - 2)
    result.stdout.fnmatch_lines(
        ["*FAILED test_ours.py::TestHalf::test_fuse_is_accurate[[]float32[]]*"]
    )


def test_safemerge_only_deselects_other_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_own(): pass")
    result = pytester.runpytest(
        "--safemerge-only", FAST, "-k", "refus", "--safemerge-dtypes=float16", "-rs"
    )
    # "refus" picks the refusal properties (small and large weights, layers) and the
    # atomicity of weights and of layers: 3 tensor cells per dtype, 2 layer cells per layer
    # kind and dtype. --safemerge-dtypes skips the other dtypes' cells (quantized layer
    # kinds have no weight dtype: they run).
    layer_kinds = len(names.UNQUANTIZED_KINDS)
    ran = 3 + 2 * (layer_kinds + len(names.QUANT_TYPES))
    skipped = 3 * 4 + 2 * layer_kinds * 2
    result.assert_outcomes(passed=ran, skipped=skipped, deselected=EVERY_CELL - ran - skipped + 1)
    result.stdout.fnmatch_lines(["*SKIPPED*float32 not selected (--safemerge-dtypes=float16)*"])


def test_under_xdist_the_rows_of_every_worker_are_gathered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "-n", "2", "--safemerge-suite", FAST, "--safemerge-report=report.json"
    )
    result.assert_outcomes(passed=EVERY_CELL)
    result.stdout.fnmatch_lines(["*= safemerge =*", "  round trip  *ok*ok*ok*ok*ok"])
    rows = rows_of(pytester.path / "report.json")
    assert len(rows) == EVERY_CELL
    # Every cell ran, and its examples came back from its worker.
    assert all(row["examples"] >= 1 and row["result"] == "passed" for row in rows.values())


# --- the model suite ---------------------------------------------------------------------


def test_tiny_model_and_adapter_are_checked_layer_by_layer(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        "--safemerge-model=tiny", "--safemerge-adapter=tiny", "--safemerge-report=r.json"
    )
    tensors = synthetic.tiny_state_dict()
    layers = [name for name, tensor in tensors.items() if tensor.ndim >= 2]
    adapted = list(synthetic.tiny_adapters())
    result.assert_outcomes(passed=len(layers) + 1 + len(adapted), skipped=1)
    result.stdout.fnmatch_lines(
        [
            f"safemerge: model tiny (*): {len(tensors)} tensors, {len(layers)} "
            f"floating-point weights of 2+ dimensions; checking all {len(layers)}",
            "safemerge: adapter *",
        ]
    )
    document = json.loads((pytester.path / "r.json").read_text())
    rows = document["results"]
    assert {(row["contract"], row["property"]) for row in rows} == {
        ("model", "model layers"),
        ("model", "adapter layers"),
    }
    assert all(set(row) >= ROW_KEYS and row["layer"] for row in rows)
    assert all(0 < row["worst_fraction"] <= 1 for row in rows if row["result"] == "passed")


def test_a_broken_adapter_fails_naming_its_layers(pytester: pytest.Pytester) -> None:
    model = pytester.path / "model"
    model.mkdir()
    tensors = synthetic.tiny_state_dict(torch.float16)
    safemerge.io.atomic.save_tensors(model / "model.safetensors", tensors)
    adapters = synthetic.tiny_adapters()
    adapters["layers.1.v_proj.weight"].lora_B[3, 2] = float("nan")  # a training blow-up
    big = adapters["layers.0.o_proj.weight"]
    big.lora_B.mul_(1e7)  # finite in float32, beyond float16 after the cast
    safemerge.write_peft_adapter(pytester.path / "adapter", adapters)
    result = pytester.runpytest(
        "--safemerge-model=model", "--safemerge-adapter=adapter", "-k", "adapter_layer"
    )
    result.assert_outcomes(passed=len(adapters) - 2, failed=2, deselected=len(tensors))
    result.stdout.fnmatch_lines(
        [
            "*the adapter's merge into layers.0.o_proj.weight was refused: NonFiniteMergeError*",
            "*the adapter's merge into layers.1.v_proj.weight was refused: NonFiniteMergeError*",
            "FAILED safemerge/test_model.py::test_adapter_layer[[]layers.0.o_proj.weight[]]*",
            "FAILED safemerge/test_model.py::test_adapter_layer[[]layers.1.v_proj.weight[]]*",
        ]
    )


def test_an_adapter_that_does_not_fit_fails_to_load(pytester: pytest.Pytester) -> None:
    model = pytester.path / "model"
    model.mkdir()
    tensors = synthetic.tiny_state_dict()
    del tensors["layers.1.k_proj.weight"]
    safemerge.io.atomic.save_tensors(model / "model.safetensors", tensors)
    safemerge.write_peft_adapter(pytester.path / "adapter", synthetic.tiny_adapters())
    result = pytester.runpytest(
        "--safemerge-model=model", "--safemerge-adapter=adapter", "-k", "adapter"
    )
    result.assert_outcomes(failed=1, skipped=1, deselected=len(tensors) - 1)
    result.stdout.fnmatch_lines(
        ["*did not load*", "*base_model.model.layers.1.k_proj: no base weight matches*"]
    )


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_the_quantized_path_runs_on_the_models_layers(
    pytester: pytest.Pytester, quant: str
) -> None:
    result = pytester.runpytest(
        "--safemerge-model=tiny",
        f"--safemerge-quant={quant}",
        "--safemerge-layers=layers.0.*_proj.weight",
        "-k",
        "quantized",
        "-W",
        "ignore::DeprecationWarning",
    )
    result.assert_outcomes(passed=7, deselected=9)
    result.stdout.fnmatch_lines([f"quantized layers ({quant}) (safemerge):"])


def test_layers_are_sampled_covering_every_shape(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--safemerge-model=tiny", "--safemerge-max-layers=5", "--co")
    result.stdout.fnmatch_lines(["*checking a sample of 5 covering all 5 distinct shapes*"])
    collected = [line for line in result.stdout.lines if "test_layer_merges[" in line]
    assert len(collected) == 5


def test_a_glob_that_matches_nothing_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--safemerge-model=tiny", "--safemerge-layers=q_proj")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*matches none of the model's 16 weights*'*query*'*"])


def test_the_real_minilm_layers(pytester: pytest.Pytester, minilm: Path) -> None:
    result = pytester.runpytest(
        f"--safemerge-model={minilm / 'model' / 'model.safetensors'}",
        "--safemerge-layers=encoder.layer.0.attention.self.*.weight",
        "--safemerge-dtype=bfloat16",
    )
    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines(["*104 tensors, 40 floating-point weights*checking the 3*"])


# --- fixtures ----------------------------------------------------------------------------


def test_safemerge_fuse_restores_every_bit_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        LAYERS = {}

        def test_fuse(safemerge_fuse, safemerge_layer_factory, safemerge_adapter_factory):
            layer = safemerge_layer_factory("linear", 32, 16, dtype=torch.bfloat16)
            LAYERS["linear"] = (layer, layer.weight.detach().clone())
            safemerge_fuse(layer, safemerge_adapter_factory(layer, std=1.0), scale=0.5)
            assert not torch.equal(layer.weight, LAYERS["linear"][1])
            weight = torch.randn(8, 4)
            LAYERS["tensor"] = (weight, weight.clone())
            safemerge_fuse(weight, safemerge_adapter_factory(torch.nn.Linear(4, 8), std=1.0))

        def test_restored():
            for tensor, original in (
                (LAYERS["linear"][0].weight, LAYERS["linear"][1]), LAYERS["tensor"]
            ):
                assert torch.equal(tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.int32),
                                   original.view(torch.int16 if original.dtype == torch.bfloat16 else torch.int32))

        def test_tampering_is_caught(safemerge_fuse, safemerge_layer_factory, safemerge_adapter_factory):
            layer = safemerge_layer_factory("conv2d", 3, 8)
            safemerge_fuse(layer, safemerge_adapter_factory(layer), name="stem")
            with torch.no_grad():
                layer.weight[0, 0, 0, 0] += 1.0
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*safemerge_fuse could not restore what the test fused*", "*stem: could not be unfused*"]
    )


@pytest.mark.parametrize(
    "kind", ["linear", "embedding", "conv1d", "conv3d", "fan_in_fan_out", "nf4", "int8"]
)
def test_factories_make_layers_and_adapters_that_fuse(
    kind: str, safemerge_layer_factory, safemerge_adapter_factory, safemerge_fuse
) -> None:
    layer = safemerge_layer_factory(kind, 64, 32, seed=3)
    record = safemerge_fuse(layer, safemerge_adapter_factory(layer, rank=4, alpha=8))
    assert record.layer == type(layer).__name__
    poisoned = safemerge_adapter_factory(layer, poison="-inf")
    with pytest.raises(safemerge.NonFiniteMergeError) as refused:
        safemerge.fuse(layer, poisoned)
    assert refused.value.nan_count + refused.value.neginf_count > 0
