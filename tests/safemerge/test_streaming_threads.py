"""How many threads a streaming fuse computes on: the cores other processes leave idle."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import safemerge
from safemerge import synthetic
from safemerge.merge import engine
from safemerge.model import idle_cores, streaming
from safemerge.model.read_ahead import ReadAhead


@pytest.mark.parametrize(("busy", "limit", "expected"), [(None, 3, 3), (0, 1, 1), (1, 2, 1)])
def test_threads_are_the_idle_cores_within_the_limit(
    monkeypatch: pytest.MonkeyPatch, busy: int | None, limit: int, expected: int
) -> None:
    monkeypatch.setattr(idle_cores, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(idle_cores.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert idle_cores.fuse_threads(limit) == expected


def test_all_cores_busy_elsewhere_still_leaves_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idle_cores, "busy_elsewhere", lambda: 64)
    assert idle_cores.fuse_threads(8) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_busy_elsewhere_counts_other_processes_tasks() -> None:
    busy = idle_cores.busy_elsewhere(samples=2, pause=0.0)
    assert busy is not None and busy >= 0


def test_a_task_state_is_read_after_the_last_parenthesis(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("12 (odd ) S (name) R 1 2 3\n")
    assert idle_cores._running(tmp_path)
    (tmp_path / "stat").write_text("12 (R) S 1 2 3\n")
    assert not idle_cores._running(tmp_path)
    assert not idle_cores._running(tmp_path / "gone")


def test_a_fuse_computes_on_the_chosen_threads_and_restores_torchs_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    safemerge.io.atomic.save_tensors(
        base / "model.safetensors", synthetic.tiny_state_dict(torch.float32)
    )
    adapter = safemerge.write_peft_adapter(tmp_path / "adapter", synthetic.tiny_adapters())
    chosen: list[int] = []
    monkeypatch.setattr(idle_cores, "fuse_threads", lambda limit: chosen.append(limit) or 2)
    during: list[tuple[int, int]] = []
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        safemerge.fuse_files(
            base,
            [adapter],
            tmp_path / "out",
            progress=lambda _: during.append((torch.get_num_threads(), engine.block_threads())),
        )
        assert torch.get_num_threads() == 3 and engine.block_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert chosen[0] == 3  # torch's count before the fuse is the most it may use
    # The blocks on the chosen 2 threads, every torch op on one.
    assert set(during) == {(1, 2)}


def _checkpoint_file(tmp_path: Path) -> Path:
    tensors = {f"t{i}": torch.arange(100, dtype=torch.float32) + i for i in range(5)}
    path = tmp_path / "model.safetensors"
    safemerge.io.atomic.save_tensors(path, tensors)
    return path


def test_reads_ahead_give_what_a_direct_read_gives_in_any_order(tmp_path: Path) -> None:
    path = _checkpoint_file(tmp_path)
    with safemerge.open_checkpoint(path) as checkpoint:
        plan = streaming._plan(checkpoint, None)
        with ReadAhead(checkpoint, plan) as read_ahead:
            # In plan order, then out of it (as a LoRA bias is read with its weight), and
            # in another dtype than the one read ahead.
            for name in ("t0", "t1", "t3", "t2", "t4"):
                assert torch.equal(read_ahead.read(name, torch.float32), checkpoint.read(name))
            assert read_ahead.read("t0", torch.bfloat16).dtype == torch.bfloat16


def test_an_error_reading_ahead_is_raised_when_its_tensor_is_asked_for(tmp_path: Path) -> None:
    path = _checkpoint_file(tmp_path)
    with safemerge.open_checkpoint(path) as checkpoint:
        plan = streaming._plan(checkpoint, None)
        with ReadAhead(checkpoint, plan) as read_ahead:
            read_ahead.read("t0", torch.float32)
            pending = read_ahead._pending
            assert pending is not None and pending[0] == "t1"
            pending[2].result()  # t1 read ahead while the file is still whole
            with path.open("r+b") as file:  # truncated while open
                file.truncate(path.stat().st_size - 8)
            assert torch.equal(read_ahead.read("t1", torch.float32), torch.arange(100.0) + 1)
            with pytest.raises(safemerge.CheckpointError, match="truncated"):
                read_ahead.read("t2", torch.float32)
