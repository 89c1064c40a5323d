"""The pipeline suite (``--safemerge-pipeline``): diffusers' own pipeline fuse fails both
properties in every dtype (its findings: ``benchmarks/diffusers_findings/
pipeline_fuse_not_atomic.py``, ``unfuse_keeps_lora_scale.py``, ``unfuse_not_exact.py``),
safemerge's passes them; one subprocess run from an empty directory, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

SUITE_MODULE = """
import pytest

from pytest_safemerge.suite.pipeline_contract import PipelineConformanceSuite
from pytest_safemerge.targets.diffusers_pipeline import DIFFUSERS_PIPELINE, SAFEMERGE_PIPELINE


class TestDiffusers(PipelineConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_pipeline_fuse(self):
        return DIFFUSERS_PIPELINE


class TestSafemerge(PipelineConformanceSuite):
    @pytest.fixture(scope="session")
    def safemerge_pipeline_fuse(self):
        return SAFEMERGE_PIPELINE
"""


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pipeline-suite")
    (root / "test_pipelines.py").write_text(SUITE_MODULE)
    report = root / "report.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0"),
            *("test_pipelines.py", f"--safemerge-report={report}"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    found: list[dict[str, Any]] = json.loads(report.read_text())["results"]
    return found


def _cells(rows: list[dict[str, Any]], suite: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (row["property"], row["dtype"]): row for row in rows if f"::{suite}::" in row["nodeid"]
    }


def test_diffusers_fails_both_properties_in_every_dtype(rows: list[dict[str, Any]]) -> None:
    cells = _cells(rows, "TestDiffusers")
    assert set(cells) == {
        (prop, dtype)
        for prop in ("fuse atomicity", "unfuse restores")
        for dtype in ("float32", "float16", "bfloat16")
    }
    for (prop, dtype), row in cells.items():
        assert row["result"] == "failed", (prop, dtype)
        assert row["contract"] == "pipeline"
    atomicity = cells[("fuse atomicity", "bfloat16")]["message"]
    # It refuses (with a message about NaNs, for an Inf), after fusing the UNet.
    assert "NaNs detected" in atomicity and "unet:" in atomicity and "tensors differ" in atomicity
    restore = cells[("unfuse restores", "float32")]["message"]
    assert "tensors differ" in restore and "scaling" in restore


def test_safemerge_passes_both_properties_in_every_dtype(rows: list[dict[str, Any]]) -> None:
    cells = _cells(rows, "TestSafemerge")
    assert len(cells) == 6
    assert all(row["result"] == "passed" for row in cells.values()), cells


def test_a_bad_pipeline_spec_is_a_usage_error(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0"),
            "--safemerge-pipeline=pytest_safemerge.targets.diffusers_pipeline:Verdict",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 4
    assert "has no callable fuse_lora or unfuse_lora" in run.stderr
