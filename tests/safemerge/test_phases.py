"""The phase times a disk-to-disk fuse reports: every phase, none negative, within the total."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import safemerge
from safemerge import synthetic
from safemerge.io.phases import PHASES, PhaseTimes


def test_timing_adds_up_and_counts_a_block_that_raises() -> None:
    phases = PhaseTimes()
    with phases.timing("read"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), phases.timing("read"):
        time.sleep(0.01)
        raise RuntimeError
    assert phases.seconds["read"] >= 0.02
    assert phases.seconds["fuse"] == 0.0
    with pytest.raises(KeyError, match="unknown phase 'load'"), phases.timing("load"):
        pass


def _check(report: safemerge.ModelFuseReport) -> None:
    assert set(report.phases) == set(PHASES)
    assert all(seconds >= 0 for seconds in report.phases.values())
    assert sum(report.phases.values()) <= report.seconds
    assert report.other_seconds == pytest.approx(report.seconds - sum(report.phases.values()))
    # Every phase took place: there were tensors to read, fuse, check and write.
    assert all(seconds > 0 for seconds in report.phases.values())


def test_fuse_files_reports_its_phases(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    safemerge.io.atomic.save_tensors(
        base / "model.safetensors", synthetic.tiny_state_dict(torch.bfloat16)
    )
    adapter = safemerge.write_peft_adapter(tmp_path / "adapter", synthetic.tiny_adapters())
    _check(safemerge.fuse_files(base, [adapter], tmp_path / "merged"))


def test_an_in_memory_fuse_has_no_phases() -> None:
    report = safemerge.ModelFuseReport.in_memory([], {}, seconds=1.0)
    assert report.phases == {} and report.other_seconds == 0.0
