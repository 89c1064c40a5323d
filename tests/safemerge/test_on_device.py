"""The engine's GPU path (:mod:`safemerge.merge.on_device`), run on the CPU.

CI has no GPU, so the path is forced here. Two kinds of evidence:

* the engine's contract tests (test_fuse.py, test_properties.py, test_layers.py,
  test_model.py) run again, unchanged, with the whole session on this path
  (``-p support.device_path``), in a subprocess; only the tests that interrupt the CPU
  path's in-place block writes are left out (this path writes the weight once, after
  the verdict), and the interrupts it can meet are tested below;
* the waits for the device: however many blocks a layer has, a fuse or an unfuse reads
  device values on the host a fixed number of times.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safemerge
import safemerge.merge.correction as correction_module
from safemerge import LoraAdapter, NonFiniteMergeError
from safemerge.merge import engine, on_device
from safemerge.merge.numerics import int_view
from safemerge.merge.record import FuseRecord

ROOT = Path(__file__).resolve().parents[2]

#: The CPU path's interrupt tests: they hook calls this path does not make, and check
#: the rollback of in-place block writes this path does not do.
_CPU_PATH_ONLY = [
    "tests/safemerge/test_fuse.py::test_an_exception_midway_leaves_the_layer_untouched",
    "tests/safemerge/test_fuse.py::test_an_exception_midway_through_an_exact_unfuse_leaves_the_layer_fused",
    "tests/safemerge/test_fuse.py::test_an_exception_midway_through_a_compiled_exact_unfuse_leaves_the_layer_fused",
    "tests/safemerge/test_layers.py::test_a_fuse_in_a_buffer_that_fails_leaves_the_layer_as_it_was",
]


@pytest.mark.slow
def test_the_engine_contract_holds_on_the_device_path() -> None:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "support.device_path",
        "-n",
        "0",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/safemerge/test_fuse.py",
        "tests/safemerge/test_properties.py",
        "tests/safemerge/test_layers.py",
        "tests/safemerge/test_model.py",
    ]
    for test in _CPU_PATH_ONLY:
        command += ["--deselect", test]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def _layer(dtype: torch.dtype, rows: int = 96, columns: int = 64) -> torch.nn.Linear:
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, columns, generator=generator))
    return layer.to(dtype)


def _adapter(layer: torch.nn.Linear, scale: float = 0.05) -> LoraAdapter:
    generator = torch.Generator().manual_seed(1)
    rows, columns = layer.weight.shape
    return LoraAdapter(
        torch.randn(4, columns, generator=generator),
        torch.randn(rows, 4, generator=generator) * scale,
    )


class _Waits:
    """Counts the host's reads of device values on this path: verdicts and escape searches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        wait_for, search = on_device.wait_for, correction_module.escape_positions

        def counted_wait(value: torch.Tensor) -> bool:
            self.count += 1
            return wait_for(value)

        def counted_search(packed: torch.Tensor) -> torch.Tensor:
            self.count += 1
            return search(packed)

        monkeypatch.setattr(on_device, "wait_for", counted_wait)
        monkeypatch.setattr(on_device, "escape_positions", counted_search)
        monkeypatch.setattr(correction_module, "escape_positions", counted_search)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_waits_for_the_device_twice_a_layer_whatever_its_blocks(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 4 * 4)  # 4 rows a block: 24 blocks
    layer = _layer(dtype)
    original = int_view(layer.weight.detach()).clone()
    waits = _Waits(monkeypatch)
    with on_device.forced():
        record = safemerge.fuse(layer, _adapter(layer))
        assert isinstance(record, FuseRecord) and record.block_rows == 4
        fuse_waits, waits.count = waits.count, 0
        safemerge.unfuse(layer, record)
    assert fuse_waits <= 2, f"the fuse waited for the device {fuse_waits} times"
    assert waits.count <= 2, f"the exact unfuse waited for the device {waits.count} times"
    assert torch.equal(int_view(layer.weight.detach()), original)


def test_a_refusal_on_the_device_path_leaves_every_bit_and_counts_like_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 4 * 4)
    layer = _layer(torch.float16)
    adapter = _adapter(layer, scale=1e4)  # overflows float16 in some blocks, not all
    before = int_view(layer.weight.detach()).clone()
    with pytest.raises(NonFiniteMergeError) as on_cpu:
        safemerge.fuse(layer, adapter)
    with on_device.forced(), pytest.raises(NonFiniteMergeError) as on_the_device:
        safemerge.fuse(layer, adapter)
    assert on_the_device.value.overflow_count == on_cpu.value.overflow_count > 0
    assert on_the_device.value.first_index == on_cpu.value.first_index
    assert torch.equal(int_view(layer.weight.detach()), before)


def test_an_exception_midway_on_the_device_path_leaves_the_layer_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """This path writes the weight once, after its last block: an interrupt in any block
    of a fuse or of an unfuse leaves the weight's bits as they were."""
    from safemerge.merge.blocks import Blocks

    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 4 * 4)
    layer = _layer(torch.bfloat16)
    adapter = _adapter(layer)
    original = int_view(layer.weight.detach()).clone()
    unmerge = Blocks.unmerge
    calls = []

    def failing_unmerge(self: Blocks, *args: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("injected")
        return unmerge(self, *args)  # type: ignore[arg-type]

    with on_device.forced():
        monkeypatch.setattr(Blocks, "unmerge", failing_unmerge)
        with pytest.raises(KeyboardInterrupt):
            safemerge.fuse(layer, adapter)
        assert torch.equal(int_view(layer.weight.detach()), original)
        monkeypatch.setattr(Blocks, "unmerge", unmerge)
        record = safemerge.fuse(layer, adapter)
        fused = int_view(layer.weight.detach()).clone()
        calls.clear()
        monkeypatch.setattr(Blocks, "unmerge", failing_unmerge)
        with pytest.raises(KeyboardInterrupt):
            safemerge.unfuse(layer, record)
        assert torch.equal(int_view(layer.weight.detach()), fused)
        monkeypatch.setattr(Blocks, "unmerge", unmerge)
        safemerge.unfuse(layer, record)
    assert torch.equal(int_view(layer.weight.detach()), original)


def test_a_gpu_gets_bigger_blocks() -> None:
    rows, columns = 11008, 4096
    on_a_gpu = engine.block_rows_for(rows, columns, torch.device("cuda"))
    on_the_cpu = engine.block_rows_for(rows, columns, torch.device("cpu"))
    assert on_a_gpu * columns * 4 <= on_device.DEVICE_BLOCK_BYTES
    assert on_a_gpu >= 16 * on_the_cpu and on_a_gpu % 4 == 0
