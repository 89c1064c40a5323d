"""``safemerge fuse``: the merged model appears whole or not at all, with clear exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import safemerge
import safemerge.io.atomic
import safemerge.io.checkpoint
from safemerge import synthetic
from safemerge.cli import EXIT_CHECK_FAILED, EXIT_INPUT, EXIT_OK, EXIT_USAGE, main


@pytest.fixture
def model(tmp_path: Path) -> Path:
    directory = tmp_path / "base"
    directory.mkdir()
    safemerge.io.atomic.save_tensors(
        directory / "model.safetensors", synthetic.tiny_state_dict(torch.float16)
    )
    (directory / "config.json").write_text('{"model_type": "tiny"}')
    return directory


def adapter(tmp_path: Path, name: str = "adapter", *, seed: int = 0, nan: bool = False) -> Path:
    adapters = synthetic.tiny_adapters(seed=seed)
    if nan:
        adapters["layers.1.v_proj.weight"].lora_A[-1, -1] = float("nan")
    return safemerge.write_peft_adapter(tmp_path / name, adapters)


def test_fuse_writes_a_complete_model_and_a_summary(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = adapter(tmp_path, "a"), adapter(tmp_path, "b", seed=1)
    output = tmp_path / "merged"
    code = main(
        [
            *("fuse", str(model), str(first), str(second), "-o", str(output)),
            *("--weights", "0.7", "0.3", "--scale", "0.5", "--dtype", "bfloat16", "--quiet"),
        ]
    )
    assert code == EXIT_OK
    summary = capsys.readouterr().out
    assert "fused 14 layers" in summary and "peak memory" in summary and "parameters/s" in summary
    assert (output / "config.json").read_text() == '{"model_type": "tiny"}'
    merged = safemerge.open_checkpoint(output)
    assert merged.info("layers.0.q_proj.weight").dtype == torch.bfloat16
    # The same as fusing both adapters into the layer in memory.
    layer = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        base_weight = safemerge.open_checkpoint(model).read("layers.0.q_proj.weight")
        layer.weight.copy_(base_weight.to(torch.bfloat16))
    sets = [
        safemerge.load_adapter(path, base=safemerge.open_checkpoint(model))
        for path in (first, second)
    ]
    pairs = [
        (sets[0].layers["layers.0.q_proj.weight"], 0.7),
        (sets[1].layers["layers.0.q_proj.weight"], 0.3),
    ]
    safemerge.fuse(layer, pairs, scale=0.5)
    assert torch.equal(merged.read("layers.0.q_proj.weight"), layer.weight.detach())
    provenance = merged.metadata
    assert provenance["safemerge_version"] == safemerge.__version__
    assert sets[0].digest in provenance["safemerge_adapters"]


def test_json_report(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fuse", str(model), str(adapter(tmp_path)), "-o", str(tmp_path / "m"), "--json"])
    assert code == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 14
    assert all(0 < layer["worst_error_of_bound"] <= 1 for layer in report["layers"])
    phases = report["phases"]
    assert set(phases) == {"read", "fuse", "check", "write", "fsync", "other"}
    assert all(seconds >= 0 for seconds in phases.values())
    # "other" is the rest of the total, so all of them add up to it.
    assert sum(phases.values()) == pytest.approx(report["seconds"])


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("two weights", EXIT_USAGE, "--weights has 2 value(s) for 1 adapter(s)"),
        ("nan adapter", EXIT_CHECK_FAILED, "refusing to fuse into layer 'layers.1.v_proj.weight'"),
        ("output exists", EXIT_USAGE, "already exists"),
        ("truncated base", EXIT_INPUT, "truncated"),
    ],
)
def test_failures_exit_non_zero_with_one_paragraph_and_write_nothing(
    tmp_path: Path,
    model: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    code: int,
    message: str,
) -> None:
    output = tmp_path / "merged"
    if case == "output exists":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    if case == "truncated base":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
    path = adapter(tmp_path, nan=case == "nan adapter")
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = ["--weights", "1", "2"] if case == "two weights" else []
    assert main(["fuse", str(model), str(path), "-o", str(output), "--quiet", *extra]) == code
    captured = capsys.readouterr()
    assert captured.err.startswith("safemerge: error: ") and message in captured.err
    assert "Traceback" not in captured.err
    if case == "output exists":
        assert (output / "keep.txt").read_text() == "mine"
    else:
        assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left behind


def big_model(directory: Path, megabytes: int) -> None:
    """A model of about ``megabytes`` MB: enough tensors that writing takes a moment."""
    directory.mkdir()
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.q_proj.weight": torch.randn(1024, 1024, generator=generator)
        for i in range(megabytes // 4)
    }
    safemerge.io.atomic.save_tensors(directory / "model.safetensors", tensors)


def test_killing_the_command_leaves_nothing_or_a_complete_model(tmp_path: Path) -> None:
    base = tmp_path / "base"
    big_model(base, 96)
    checkpoint = safemerge.open_checkpoint(base)
    adapters = {
        name: synthetic.random_adapter(torch.nn.Linear(1024, 1024), seed=i)
        for i, name in enumerate(checkpoint.names)
    }
    adapter_path = safemerge.write_peft_adapter(tmp_path / "adapter", adapters)
    command = [sys.executable, "-m", "safemerge", "fuse", str(base), str(adapter_path)]
    outcomes = []
    for delay in (0.3, 0.8, 1.5, 3.0, 6.0):
        output = tmp_path / f"merged-{delay}"
        process = subprocess.Popen(
            [*command, "-o", str(output), "--quiet", "--shard-size", "20MB"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if output.exists():
            merged = safemerge.open_checkpoint(output)  # loads: every shard complete
            assert list(merged.names) == list(checkpoint.names)
            outcomes.append("complete")
        else:
            outcomes.append("nothing")
    # Whatever the moment, the final name held nothing or everything.
    assert set(outcomes) <= {"complete", "nothing"}
    assert "nothing" in outcomes, outcomes  # at least one kill landed mid-write


def break_input(kind: str, model: Path, adapter_dir: Path) -> None:
    """Damage the base model or the adapter the way real downloads and configs go wrong."""
    weights = model / "model.safetensors"
    config = adapter_dir / "adapter_config.json"
    if kind == "corrupt base":
        data = bytearray(weights.read_bytes())
        data[8:24] = b"\xff" * 16  # the JSON header is no longer JSON
        weights.write_bytes(bytes(data))
    elif kind == "lying header":
        data = weights.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4096  # claims more bytes than the file has
        text = json.dumps(header).encode().ljust(size)
        weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])
    elif kind == "index outside the directory":
        tensors = safemerge.open_checkpoint(model)
        index = {
            "metadata": {},
            "weight_map": {name: "../elsewhere.safetensors" for name in tensors.names},
        }
        weights.rename(model / "model-00001-of-00001.safetensors")
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "pickled base":
        weights.unlink()
        (model / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    elif kind in ("zero rank", "negative rank"):
        settings = json.loads(config.read_text())
        settings["r"] = 0 if kind == "zero rank" else -4
        config.write_text(json.dumps(settings))
    elif kind == "shape mismatch":
        settings = json.loads(config.read_text())
        tensors, metadata = safemerge.io.checkpoint.read_tensors(
            adapter_dir / "adapter_model.safetensors"
        )
        key = next(k for k in tensors if "q_proj.lora_B" in k)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
        safemerge.io.atomic.save_tensors(
            adapter_dir / "adapter_model.safetensors", tensors, metadata
        )
        config.write_text(json.dumps(settings))
    elif kind == "unmatched key":
        tensors, metadata = safemerge.io.checkpoint.read_tensors(
            adapter_dir / "adapter_model.safetensors"
        )
        tensors["base_model.model.layers.7.q_proj.lora_A.weight"] = torch.zeros(8, 64)
        tensors["base_model.model.layers.7.q_proj.lora_B.weight"] = torch.zeros(64, 8)
        safemerge.io.atomic.save_tensors(
            adapter_dir / "adapter_model.safetensors", tensors, metadata
        )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt base", "corrupt"),
        ("lying header", "model.safetensors"),
        ("index outside the directory", "must be a file inside the model directory"),
        ("pickled base", "safetensors"),
        ("zero rank", "rank"),
        ("negative rank", "rank"),
        ("shape mismatch", "q_proj"),
        ("unmatched key", "layers.7.q_proj"),
    ],
)
def test_broken_inputs_exit_3_and_leave_no_output(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], kind: str, message: str
) -> None:
    path = adapter(tmp_path)
    break_input(kind, model, path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    output = tmp_path / "merged"
    assert main(["fuse", str(model), str(path), "-o", str(output), "--quiet"]) == EXIT_INPUT
    captured = capsys.readouterr()
    assert captured.err.startswith("safemerge: error: ") and message in captured.err
    assert "Traceback" not in captured.err
    assert not output.exists()
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before  # inputs untouched, no temporary left


def write_other_formats(tmp_path: Path) -> dict[str, Path]:
    """The tiny adapters as a kohya file and an old diffusers file (alpha 16, rank 8)."""
    kohya: dict[str, torch.Tensor] = {}
    diffusers: dict[str, torch.Tensor] = {}
    for name, layer in synthetic.tiny_adapters().items():
        module = name.removesuffix(".weight")
        flat = "lora_unet_" + module.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"] = layer.lora_A.contiguous()
        kohya[f"{flat}.lora_up.weight"] = layer.lora_B.contiguous()
        kohya[f"{flat}.alpha"] = torch.tensor(16.0)
        diffusers[f"{module}.lora.down.weight"] = layer.lora_A.contiguous()
        diffusers[f"{module}.lora.up.weight"] = layer.lora_B.contiguous()
        diffusers[f"{module}.alpha"] = torch.tensor(16.0)
    paths = {"kohya": tmp_path / "kohya.safetensors", "diffusers": tmp_path / "old.safetensors"}
    safemerge.io.atomic.save_tensors(paths["kohya"], kohya)
    safemerge.io.atomic.save_tensors(paths["diffusers"], diffusers)
    return paths


def test_every_adapter_format_gives_the_same_merged_model(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = {"peft": adapter(tmp_path), **write_other_formats(tmp_path)}
    merged = {}
    for name, path in paths.items():
        assert main(["inspect", str(path), "--base", str(model)]) == EXIT_OK
        assert f"{name} adapter" in capsys.readouterr().out
        output = tmp_path / f"merged-{name}"
        assert main(["fuse", str(model), str(path), "-o", str(output), "--quiet"]) == EXIT_OK
        merged[name] = safemerge.open_checkpoint(output)
    names = merged["peft"].names
    for name in ("kohya", "diffusers"):
        assert merged[name].names == names
        assert all(torch.equal(merged[name].read(n), merged["peft"].read(n)) for n in names)
