"""``safemerge inspect``: a scan that writes nothing and exits non-zero for unsafe adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safemerge
import safemerge.io.atomic
import safemerge.io.checkpoint
from safemerge import synthetic
from safemerge.cli import EXIT_CHECK_FAILED, EXIT_INPUT, EXIT_OK, main


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    safemerge.io.atomic.save_tensors(path, synthetic.tiny_state_dict(torch.float16))
    return path


def write_adapter(directory: Path, **damage: float) -> Path:
    adapters = synthetic.tiny_adapters()
    if "nan" in damage:
        adapters["layers.1.v_proj.weight"].lora_B[3, 2] = float("nan")
    if "grow" in damage:
        adapters["layers.0.o_proj.weight"].lora_B.mul_(damage["grow"])
    return safemerge.write_peft_adapter(directory, adapters)


def snapshot(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    return {str(p): p.read_bytes() for p in files if p.is_file()}


def test_a_healthy_adapter_is_safe_and_nothing_is_written(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    before = {**snapshot(tmp_path)}
    assert main(["inspect", str(adapter), "--base", str(model)]) == EXIT_OK
    output = capsys.readouterr().out
    assert "peft adapter" in output and "14 layers" in output
    assert output.count(" ok") == 14 and "result: safe to merge" in output
    assert snapshot(tmp_path) == before


def test_non_finite_values_and_overflow_in_the_dtype_are_unsafe(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1e7 times the delta: finite in float32, beyond float16 once cast.
    adapter = write_adapter(tmp_path / "adapter", nan=1, grow=1e7)
    assert main(["inspect", str(adapter), "--base", str(model), "--json"]) == EXIT_CHECK_FAILED
    scan = json.loads(capsys.readouterr().out)
    assert scan["safe"] is False
    layers = {layer["base_weight"]: layer for layer in scan["layers"]}
    assert layers["layers.1.v_proj.weight"]["non_finite"] == {
        "base_model.model.layers.1.v_proj.lora_B.weight": {"nan": 1}
    }
    assert layers["layers.1.v_proj.weight"]["merge"] == "refused"
    assert layers["layers.0.o_proj.weight"]["non_finite"] == {}
    assert layers["layers.0.o_proj.weight"]["merge"] == "refused"
    assert "beyond float16's range" in layers["layers.0.o_proj.weight"]["merge_detail"]
    assert sum(layer["safe"] for layer in scan["layers"]) == 12


def test_the_dtype_option_checks_the_merge_in_that_dtype(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1e4 times the delta fits float16 (|w| < 65504) but not float8_e4m3fn (448).
    adapter = write_adapter(tmp_path / "adapter", grow=1e4)
    assert main(["inspect", str(adapter), "--base", str(model)]) == EXIT_OK
    capsys.readouterr()
    code = main(["inspect", str(adapter), "--base", str(model), "--dtype", "float8_e4m3fn"])
    assert code == EXIT_CHECK_FAILED
    assert "beyond float8_e4m3fn's range" in capsys.readouterr().out


def test_without_a_base_the_scan_reports_non_finite_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = write_adapter(tmp_path / "adapter", nan=1)
    assert main(["inspect", str(adapter)]) == EXIT_CHECK_FAILED
    output = capsys.readouterr().out
    assert "lora_B.weight: 1 nan" in output and "not checked" in output


def test_an_adapter_for_another_model_is_unsafe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = synthetic.tiny_state_dict(torch.float16)
    del tensors["layers.0.q_proj.weight"]
    model = tmp_path / "model.safetensors"
    safemerge.io.atomic.save_tensors(model, tensors)
    adapter = write_adapter(tmp_path / "adapter")
    assert main(["inspect", str(adapter), "--base", str(model)]) == EXIT_CHECK_FAILED
    output = capsys.readouterr().out
    assert "problem:" in output and "layers.0.q_proj" in output


@pytest.mark.parametrize("damage", ["missing", "truncated", "pickled"])
def test_unreadable_inputs_exit_3_with_one_clear_paragraph(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    if damage == "missing":
        target = tmp_path / "nothing"
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        target = adapter
    else:
        target = tmp_path / "adapter_model.bin"
        target.write_bytes(b"PK\x03\x04 a zip, as torch.save writes")
    assert main(["inspect", str(target), "--base", str(model)]) == EXIT_INPUT
    captured = capsys.readouterr()
    assert captured.err.startswith("safemerge: error: ")
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1
