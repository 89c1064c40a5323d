"""The PEFT contracts against an older PEFT release, installed beside the current one.

``.ci/setup`` installs PEFT :data:`RELEASE` into :data:`RELEASE_DIR` (``pip install
--no-deps --target``). One pytest run, in a subprocess from an empty directory, with that
folder first on ``PYTHONPATH``, puts ``safemerge.peft:PEFT_LORA`` under the tensor and
layer suites as a PEFT maintainer would (``benchmarks/peft_releases.py`` does the same for
any releases). :data:`RELEASE` is the oldest PEFT the contracts support: it takes the most
of the adapter's compatibility code (layers built from keyword arguments, ``set_adapter``
without ``inference_mode``, DoRA magnitudes as Parameters) and lacks the most (lora_bias,
Conv1d and Conv3d layers, DoRA on embeddings).

The run used that release; no cell failed inside the adapter (an API it does not have);
the cells of what the release lacks were skipped with its reason; exactly the cells of
:data:`FINDINGS` failed, each message showing its finding. Without the folder the test
skips, except under ``CI=true``, where it fails: CI must not lose it silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from support.peft_release import (
    RELEASE,
    RELEASE_DIR,
    Finding,
    assert_exactly_the_findings_fail,
    run_release,
)

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

SPEC = "safemerge.peft:PEFT_LORA"
#: Plugin flags beyond ``--safemerge-impl``, for the contracts still to come.
EXTRA_FLAGS: tuple[str, ...] = ()
#: Examples per property (shared among its cells): every finding below still shows.
EXAMPLES = 10
#: The weight dtypes run, within the budget: float16 shows every finding of this release
#: (bfloat16 the same ones; float32 and float8 only those of the current PEFT, which
#: tests/pytest_safemerge/test_peft_findings.py checks) and takes the adapter's code as
#: any dtype does. The quantized cells all run.
DTYPES = ("float16",)
#: The cells left out, within the budget: Hypothesis spends 30 s shrinking the DoRA case
#: of this one, which shows what the round trips of the other layer kinds show.
DESELECT = "not (test_unfuse_layer_round_trip and conv2d)"
#: The weight dtypes of the unquantized layer cells.
LAYER_DTYPES = ("float32", "float16", "bfloat16")
#: What the adapter raises when it meets an API the release does not have, or a case the
#: release cannot hold that the suite should not have made: never in a cell's message.
ADAPTER_CRASH = re.compile(r"unexpected keyword argument|takes no \[|\(added in \d")

#: The cells skipped for what the release lacks, with the reason (before any dtype).
SKIPPED = {
    f"test_{prop}[{layer}-{dtype}]": reason
    for layer, reason in (
        ("conv1d", "PEFT 0.10.0 has no LoRA layer for Conv1d (added in 0.15.0)"),
        ("conv3d", "PEFT 0.10.0 has no LoRA layer for Conv3d (added in 0.14.0)"),
    )
    for dtype in LAYER_DTYPES
    for prop in (
        "fuse_layer_is_accurate",
        "fuse_layer_keeps_form",
        "fuse_layer_leaves_adapters_unmodified",
        "fuse_layer_refuses_non_finite",
        "layer_refusal_leaves_layer_unchanged",
        "unfuse_layer_round_trip",
    )
}


_HALF_LAYERS = ("linear", "embedding", "conv2d", "fan_in_fan_out")
_INT8 = (
    "fuse_layer_is_accurate",
    "fuse_layer_keeps_form",
    "fuse_layer_leaves_adapters_unmodified",
    "fuse_layer_refuses_non_finite",
    "layer_refusal_leaves_layer_unchanged",
    "unfuse_layer_round_trip",
)
FINDINGS = {
    "half precision turns float32": Finding(
        "a float16 weight is merged with the float32 delta and kept float32: a weight that "
        "changes dtype, and no refusal when the sum is past float16",
        (
            "test_fuse_is_accurate[float16]",
            "test_fuse_keeps_form[float16]",
            "test_fuse_refuses_non_finite[float16]",
            "test_fuse_refuses_non_finite_in_large_weights[float16]",
            *(
                f"test_{prop}[{layer}-float16]"
                for layer in _HALF_LAYERS
                for prop in (
                    "fuse_layer_is_accurate",
                    "fuse_layer_keeps_form",
                    "fuse_layer_refuses_non_finite",
                    "unfuse_layer_round_trip",
                )
                if f"{prop}[{layer}" != "unfuse_layer_round_trip[conv2d"  # DESELECT
            ),
        ),
        (
            r"\[accuracy\] the fused weight changed form: shape [^;]* dtype torch\.float32, "
            r"expected shape [^;]* dtype torch\.float16",
            r"\[refusal\] fuse did not refuse a merge that is not finite in torch\.float16 "
            r"\(cast-overflow",
            r"\[layer refusal\] fuse_layer did not refuse a merge that is not finite "
            r"\(cast-overflow: .*beyond torch\.float16's threshold 65520; embedding layer",
            r"\[layer round trip\] after fuse_layer and unfuse_layer, the weight of the embedding "
            r"layer, .* is torch\.float32; it was torch\.float16",
        ),
        "0.16.0 (huggingface/peft#2433)",
    ),
    "int8 merge on today's bitsandbytes": Finding(
        "the int8 merge calls bitsandbytes.functional.double_quant, which today's "
        "bitsandbytes (0.50) no longer has: every int8 merge crashes",
        tuple(f"test_{prop}[int8]" for prop in _INT8),
        (
            r"\[layer accuracy\] crashed on a case whose merge is finite \(random case, int8 "
            r"layer.*AttributeError: module 'bitsandbytes\.functional' has no attribute "
            r"'double_quant'",
            r"\[layer refusal\] refused by crashing: AttributeError: .*'double_quant'",
        ),
        "0.14.0 (huggingface/peft#2245)",
    ),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The PEFT the run imported (``peft``) and the report's rows (``rows``: ``test[id]``
    -> row) of one run of the suites against :data:`RELEASE`."""
    done = run_release(
        tmp_path_factory.mktemp("peft_release"),
        [
            f"--safemerge-impl={SPEC}",
            f"--safemerge-examples={EXAMPLES}",
            f"--safemerge-dtypes={','.join(DTYPES)}",
            "-k",
            DESELECT,
            *EXTRA_FLAGS,
        ],
    )
    return {"peft": done.peft, "rows": done.rows}


def test_the_run_used_the_release(run: dict[str, Any]) -> None:
    assert run["peft"]["version"] == RELEASE
    assert Path(run["peft"]["path"]).is_relative_to(RELEASE_DIR), run["peft"]["path"]


def test_no_cell_failed_inside_the_adapter(run: dict[str, Any]) -> None:
    crashed = {
        cell: row["message"]
        for cell, row in run["rows"].items()
        if row["result"] == "failed" and ADAPTER_CRASH.search(str(row["message"]))
    }
    assert not crashed


def test_what_the_release_lacks_is_skipped_with_its_reason(run: dict[str, Any]) -> None:
    skipped = {
        cell: row["message"]
        for cell, row in run["rows"].items()
        if row["result"] == "skipped" and "not selected (--safemerge-dtypes" not in row["message"]
    }
    assert skipped.keys() == SKIPPED.keys()
    for cell, reason in SKIPPED.items():
        assert skipped[cell] == f"{SPEC}: {reason}", cell


def test_exactly_the_findings_of_the_release_fail(run: dict[str, Any]) -> None:
    assert_exactly_the_findings_fail(run["rows"], FINDINGS)


def test_the_other_cells_pass_over_real_cases(run: dict[str, Any]) -> None:
    passed = [row for row in run["rows"].values() if row["result"] == "passed"]
    assert passed and all(row["examples"] > 0 for row in passed)
