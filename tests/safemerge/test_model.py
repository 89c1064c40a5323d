"""safemerge.model: whole-model fuses as transactions, in memory and from disk to disk."""

from __future__ import annotations

import copy
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import safemerge
import safemerge.io.atomic
import safemerge.io.checkpoint
import safemerge.model.in_memory as in_memory
import safemerge.model.streaming as streaming
from safemerge import (
    AdapterSet,
    CheckpointError,
    LoraAdapter,
    ModelFuseError,
    ModelFuseReport,
    ModelWriteError,
    NonFiniteMergeError,
    TensorResult,
    fuse,
    fuse_files,
    fuse_model,
    load_adapter,
    open_checkpoint,
    unfuse_model,
    write_model,
    write_peft_adapter,
)
from safemerge.io.writer import leftover_temporaries
from safemerge.merge.bound_check import block_bound, worst_error_of_bound
from safemerge.merge.bounds import merge_bound
from safemerge.merge.engine import pinned_threads
from safemerge.synthetic import random_adapter, random_layer

LINEAR_LAYERS = [f"layers.{block}.{name}" for block in range(3) for name in ("q", "up")]


class Tiny(nn.Module):
    """Every layer kind: an embedding, a conv stem, linears, a GPT-2 style (in, out) layer."""

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        self.embed = random_layer("embedding", 50, 16, dtype=dtype, seed=seed)
        self.stem = nn.ModuleDict(
            {"conv": random_layer("conv2d", 3, 8, dtype=dtype, seed=seed + 1)}
        )
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q": random_layer("linear", 16, 16, dtype=dtype, seed=seed + 10 + block),
                    "up": random_layer("linear", 16, 40, dtype=dtype, seed=seed + 20 + block),
                }
            )
            for block in range(3)
        )
        self.head = nn.ModuleDict(
            {"c_attn": random_layer("fan_in_fan_out", 16, 24, dtype=dtype, seed=seed + 30)}
        )
        self.norm = nn.LayerNorm(16).to(dtype)
        self.register_buffer("position_ids", torch.arange(12))


def _adapters(model: Tiny, directory: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Two PEFT adapters: one for the embedding, the conv and the linears; one (fan_in_fan_out,
    with a LoRA bias) for the head."""
    main: dict[str, LoraAdapter] = {
        "embed.weight": random_adapter(model.embed, rank=4, alpha=8, seed=seed),
        "stem.conv.weight": random_adapter(model.stem["conv"], rank=2, seed=seed + 1),
    }
    for position, name in enumerate(LINEAR_LAYERS):
        main[f"{name}.weight"] = random_adapter(
            model.get_submodule(name), rank=4, alpha=16, std=0.5, seed=seed + 2 + position
        )
    head = {
        "head.c_attn.weight": random_adapter(
            model.head["c_attn"], rank=3, lora_bias=True, std=0.3, seed=seed + 9
        )
    }
    first = write_peft_adapter(directory / "main", main, kinds={"embed.weight": "embedding"})
    second = write_peft_adapter(directory / "head", head)
    return first, second


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.is_floating_point():
        return tensor.view(
            {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        )
    return tensor


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _assert_same_bits(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(_bits(left[name]), _bits(right[name])), f"{name} differs"


def _fused_layer_by_layer(
    module: nn.Module, sets: list[tuple[AdapterSet, float]], scale: float = 1.0
) -> nn.Module:
    """The reference: the same fuses, one safemerge.fuse per layer, on a copy."""
    expected = copy.deepcopy(module)
    requested: dict[str, list[tuple[LoraAdapter, float]]] = {}
    for adapter_set, weight in sets:
        for name, adapter in adapter_set.layers.items():
            requested.setdefault(name, []).append((adapter, weight))
    for name, pairs in requested.items():
        fuse(expected.get_submodule(name.removesuffix(".weight")), pairs, scale=scale, name=name)
    return expected


def _digests(*paths: Path) -> dict[str, str]:
    found = {}
    for root in paths:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Tiny, list[tuple[AdapterSet, float]], tuple[Path, Path]]:
    model = Tiny()
    paths = _adapters(model, tmp_path / "adapters")
    base = model.state_dict()
    sets = [(load_adapter(paths[0], base=base), 1.0), (load_adapter(paths[1], base=base), 1.0)]
    return model, sets, paths


# -- fuse_model ----------------------------------------------------------------------------


def test_fuse_model_equals_fusing_layer_by_layer(
    tiny: tuple[Tiny, list[tuple[AdapterSet, float]], tuple[Path, Path]],
) -> None:
    model, sets, _ = tiny
    expected = _fused_layer_by_layer(model, sets, scale=0.7)
    report = fuse_model(model, sets, scale=0.7)
    _assert_same_bits(_snapshot(model), _snapshot(expected))
    assert isinstance(report, ModelFuseReport)
    names = [result.name for result in report.layers]
    assert names == [
        "embed.weight",
        "stem.conv.weight",
        *(f"{name}.weight" for name in LINEAR_LAYERS),
        "head.c_attn.weight",
    ]  # module order
    kinds = {result.name: result.kind for result in report.layers}
    assert kinds["embed.weight"] == "embedding" and kinds["stem.conv.weight"] == "conv2d"
    assert kinds["head.c_attn.weight"] == "fan_in_fan_out"
    assert all(0 <= result.worst_error_of_bound <= 1 for result in report.layers)  # type: ignore[operator]
    assert set(report.records) == set(names) and all(r.exact for r in report.records.values())
    assert report.fused_parameters == sum(result.numel for result in report.layers)
    assert report.tensors_written == 0 and report.output is None and report.peak_rss_bytes > 0


def test_several_adapters_on_one_layer_are_fused_together(tmp_path: Path) -> None:
    model = Tiny()
    first = _adapters(model, tmp_path / "one", seed=0)[0]
    second = _adapters(model, tmp_path / "two", seed=100)[0]
    base = model.state_dict()
    sets = [(load_adapter(first, base=base), 0.7), (load_adapter(second, base=base), -0.4)]
    expected = _fused_layer_by_layer(model, sets)
    report = fuse_model(model, sets)
    _assert_same_bits(_snapshot(model), _snapshot(expected))
    assert {result.adapters for result in report.layers} == {2}
    assert all(len(record.adapters) == 2 for record in report.records.values())


def test_unfuse_model_restores_every_bit(
    tiny: tuple[Tiny, list[tuple[AdapterSet, float]], tuple[Path, Path]],
) -> None:
    model, sets, _ = tiny
    model.to(torch.bfloat16)
    before = _snapshot(model)
    sets = [(load_adapter(path, base=model.state_dict()), 1.0) for path in tiny[2]]
    report = fuse_model(model, sets)
    assert any(not torch.equal(_bits(before[n]), _bits(t)) for n, t in _snapshot(model).items())
    unfuse_model(model, report)
    _assert_same_bits(_snapshot(model), before)


def _failing_fuse(monkeypatch: pytest.MonkeyPatch, at: int, error: BaseException) -> list[str]:
    """Make the Nth layer's fuse raise ``error`` (before changing it, as a real fuse does),
    in memory (``fuse``) and from files (``fused_tensors``)."""
    calls: list[str] = []

    def failing(real: Any) -> Any:
        def fuse_or_fail(layer: nn.Module, adapters: Any, **options: Any) -> Any:
            calls.append(options["name"])
            if len(calls) == at:
                raise error
            return real(layer, adapters, **options)

        return fuse_or_fail

    monkeypatch.setattr(in_memory, "fuse", failing(in_memory.fuse))
    monkeypatch.setattr(streaming, "fused_tensors", failing(streaming.fused_tensors))
    return calls


@pytest.mark.parametrize("at", [1, 4, 9])
def test_an_error_midway_restores_every_layer(
    tiny: tuple[Tiny, list[tuple[AdapterSet, float]], tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    at: int,
) -> None:
    model, sets, _ = tiny
    model.to(torch.bfloat16)  # where arithmetic unfuse would not give the bits back
    sets = [(load_adapter(path, base=model.state_dict()), 1.0) for path in tiny[2]]
    before = _snapshot(model)
    calls = _failing_fuse(monkeypatch, at, RuntimeError("disk on fire"))
    with pytest.raises(ModelFuseError, match="failed with RuntimeError: disk on fire") as caught:
        fuse_model(model, sets)
    _assert_same_bits(_snapshot(model), before)
    error = caught.value
    assert error.layers == (calls[-1],)
    assert error.rolled_back == tuple(reversed(calls[:-1]))
    assert f"{at - 1} layer(s) fused before it were restored exactly" in str(error)
    assert isinstance(error.__cause__, RuntimeError)


def test_a_keyboard_interrupt_midway_restores_every_layer(
    tiny: tuple[Tiny, list[tuple[AdapterSet, float]], tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, sets, _ = tiny
    before = _snapshot(model)
    _failing_fuse(monkeypatch, 5, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as caught:
        fuse_model(model, sets)
    _assert_same_bits(_snapshot(model), before)
    assert "the model is unchanged" in "\n".join(getattr(caught.value, "__notes__", []))


def _nan_adapter(model: Tiny, directory: Path, layer: str) -> Path:
    bad = random_adapter(model.get_submodule(layer), rank=4, seed=5)
    bad.lora_B[1, 2] = float("nan")
    layers = {
        f"{name}.weight": random_adapter(model.get_submodule(name), rank=4, seed=i)
        for i, name in enumerate(LINEAR_LAYERS)
    }
    layers[f"{layer}.weight"] = bad
    return write_peft_adapter(directory, layers)


def test_a_nan_adapter_layer_is_refused_and_the_model_restored(tmp_path: Path) -> None:
    model = Tiny(torch.float16)
    path = _nan_adapter(model, tmp_path / "nan", "layers.1.up")
    before = _snapshot(model)
    with pytest.raises(NonFiniteMergeError) as caught:
        fuse_model(model, [load_adapter(path, base=model.state_dict())])
    _assert_same_bits(_snapshot(model), before)
    assert caught.value.layer == "layers.1.up.weight"
    assert caught.value.nan_count > 0
    notes = "\n".join(caught.value.__notes__)
    assert "the 3 layer(s) fused before it were restored exactly" in notes


def test_misfits_are_all_refused_up_front(
    tiny: tuple[Tiny, list[tuple[AdapterSet, float]], tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, sets, _ = tiny
    before = _snapshot(model)
    good = sets[0][0]
    dora = random_adapter(model.layers[2]["q"], rank=2, dora=True, seed=3)
    wrong = AdapterSet(
        format="peft",
        path=Path("hand-made"),
        layers={
            "nope.weight": good.layers["layers.0.q.weight"],
            "layers.0.q.weight": good.layers["layers.0.up.weight"],  # (40, 16) for (16, 16)
            "norm.weight": good.layers["layers.0.q.weight"],  # a LayerNorm
            "layers.2.q.weight": dora,  # DoRA together with the first set's adapter
            "layers.1.q.weight": good.layers["layers.1.q.weight"],  # fine
        },
        config={},
        digest="0" * 64,
    )
    calls = _failing_fuse(monkeypatch, 10**6, RuntimeError("unused"))
    with pytest.raises(ModelFuseError, match=r"refusing to fuse: 4 layer\(s\)") as caught:
        fuse_model(model, [sets[0], wrong])
    assert calls == []
    _assert_same_bits(_snapshot(model), before)
    problems = dict(caught.value.problems)
    assert set(problems) == {
        "nope.weight",
        "layers.0.q.weight",
        "norm.weight",
        "layers.2.q.weight",
    }
    assert "no module 'nope'" in problems["nope.weight"]
    assert "out_features=16" in problems["layers.0.q.weight"]
    assert "LayerNorm" in problems["norm.weight"]
    assert "DoRA" in problems["layers.2.q.weight"]


def test_tied_weights_are_refused(tmp_path: Path) -> None:
    model = Tiny()
    model.lm_head = nn.Linear(16, 50, bias=False)
    model.lm_head.weight = model.embed.weight  # tied, as in many language models
    path = write_peft_adapter(
        tmp_path / "a", {"lm_head.weight": random_adapter(model.lm_head, rank=2)}
    )
    adapter_set = load_adapter(path, base=dict(model.named_parameters(remove_duplicate=False)))
    with pytest.raises(ModelFuseError, match="tied weights") as caught:
        fuse_model(model, [adapter_set])
    assert caught.value.layers == ("lm_head.weight",)


def test_prefix_maps_a_sub_model_s_names(tmp_path: Path) -> None:
    outer = nn.ModuleDict({"model": Tiny()})
    inner = outer["model"]
    path = _adapters(inner, tmp_path / "a")[0]  # type: ignore[arg-type]
    adapter_set = load_adapter(path, base=inner.state_dict())
    expected = _fused_layer_by_layer(inner, [(adapter_set, 1.0)])
    report = fuse_model(outer, [adapter_set], prefix="model.")
    assert report.layers[0].name == "model.embed.weight"
    _assert_same_bits(_snapshot(inner), _snapshot(expected))


def test_dora_on_a_quantized_layer_is_refused_up_front() -> None:
    pytest.importorskip("bitsandbytes")
    weight = torch.randn(16, 32) * 0.1
    layer = safemerge.synthetic.quantized_linear(weight, "nf4")
    model = nn.ModuleDict({"q": layer, "k": random_layer("linear", 32, 16)})
    shapes = safemerge.weight_shapes(model)
    assert shapes["q.weight"] == (16, 32)
    dora = LoraAdapter(torch.randn(2, 32), torch.randn(16, 2), magnitude=torch.ones(16))
    adapter_set = AdapterSet("peft", Path("x"), {"q.weight": dora}, {}, "0" * 64)
    before = layer.weight.detach().clone()
    with pytest.raises(ModelFuseError, match="DoRA adapters are not fused into quantized"):
        fuse_model(model, [adapter_set])
    assert torch.equal(layer.weight.detach(), before)


# -- the per-layer bound check ----------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2],
)
def test_the_blocked_bound_is_merge_bound_s(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(40, 24, generator=generator) * 0.05).to(dtype)
    weight[0, :4] = torch.tensor([0.0, 2.0**-20, 1.0, 2.0]).to(dtype)  # zeros, tiny, powers of 2
    terms = [
        (torch.randn(40, 3, generator=generator), torch.randn(3, 24, generator=generator), 1 / 3),
        (torch.randn(40, 2, generator=generator), torch.randn(2, 24, generator=generator), -1e-40),
    ]
    reference, bound = merge_bound(weight, terms, dtype)
    blocked_reference, blocked_bound = block_bound(weight, terms, dtype)
    assert torch.equal(blocked_reference, reference)
    # The same sum in another order: equal up to float64 rounding, never larger; exactly
    # half where log2 rounded a magnitude just below a power of two up to it.
    assert bool((blocked_bound <= bound * (1 + 1e-12)).all())
    assert bool((blocked_bound >= bound / 2).all())
    assert torch.isclose(blocked_bound, bound, rtol=1e-12, atol=0).float().mean() > 0.99
    fused = (reference.to(torch.float32)).to(dtype)  # a correct merge: within the bound
    assert worst_error_of_bound(weight, fused, terms, dtype) <= 1.0
    off = fused.to(torch.float64).clone()
    off[7, 5] += 3 * bound[7, 5]
    assert worst_error_of_bound(weight, off, terms, dtype) >= 2.0


# -- fuse_files ----------------------------------------------------------------------------


def _base_directory(model: nn.Module, directory: Path, *, shard_size: int | None) -> Path:
    """The model saved as a Hugging Face directory, with the files that go with it."""
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if shard_size is None:
        directory.mkdir(parents=True)
        safemerge.io.atomic.save_tensors(directory / "model.safetensors", state, {"format": "pt"})
    else:
        write_model(directory, state, shard_size=shard_size)
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    (directory / "tokenizer.json").write_text("{}")
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04stale pickle")
    return directory


def _read_dir(directory: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard_size", [None, 3000])
def test_fuse_files_writes_what_fuse_model_gives(
    tmp_path: Path, dtype: torch.dtype, shard_size: int | None
) -> None:
    model = Tiny(dtype)
    paths = _adapters(model, tmp_path / "adapters")
    base = _base_directory(model, tmp_path / "base", shard_size=shard_size)
    inputs = _digests(base, tmp_path / "adapters")
    seen: list[TensorResult] = []
    report = fuse_files(
        base, [paths[0], (paths[1], 0.5)], tmp_path / "out", scale=0.9, progress=seen.append
    )
    assert _digests(base, tmp_path / "adapters") == inputs  # inputs only read
    sets = [(load_adapter(paths[0], base=model.state_dict()), 1.0)]
    sets.append((load_adapter(paths[1], base=model.state_dict()), 0.5))
    fuse_model(model, sets, scale=0.9)
    written = _read_dir(tmp_path / "out")
    _assert_same_bits(written, _snapshot(model))
    # The files themselves: shards and index as transformers reads them, provenance, copies.
    out = tmp_path / "out"
    index = out / "model.safetensors.index.json"
    shards = sorted(out.glob("*.safetensors"))
    assert index.exists() == (len(shards) > 1) and report.shard_count == len(shards)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["format"] == "pt"
        assert metadata["safemerge_version"] == safemerge.__version__
        assert metadata["safemerge_scale"] == "0.9" and metadata["safemerge_dtype"] == "keep"
        adapters = json.loads(metadata["safemerge_adapters"])
        assert [(a["path"], a["format"], a["weight"]) for a in adapters] == [
            ("main", "peft", 1.0),
            ("head", "peft", 0.5),
        ]
        digest = hashlib.sha256((paths[0] / "adapter_model.safetensors").read_bytes())
        assert adapters[0]["digest"] == f"sha256:{digest.hexdigest()}"
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert (out / "tokenizer.json").exists() and not (out / "pytorch_model.bin").exists()
    assert sorted(report.copied) == ["config.json", "tokenizer.json"]
    # The report: every tensor, in order, the fused ones checked against their bound.
    assert [result.name for result in report.layers] == list(open_checkpoint(base).names)
    assert seen == list(report.layers)
    assert [result.position for result in seen] == list(range(1, len(seen) + 1))
    # Each tensor's time is counted once: the column sums to no more than the whole call.
    assert 0 < sum(result.seconds for result in report.layers) <= report.seconds
    fused = {result.name: result for result in report.fused}
    assert len(fused) == 9 and fused["head.c_attn.weight"].kind == "fan_in_fan_out"
    assert all(0 <= result.worst_error_of_bound <= 1 for result in fused.values())  # type: ignore[operator]
    bias = next(result for result in report.layers if result.name == "head.c_attn.bias")
    assert bias.kind == "bias" and bias.adapters == 1  # its LoRA bias was added
    assert report.tensors_written == len(written)
    assert report.parameters == sum(t.numel() for t in written.values())
    assert report.written_bytes == sum(t.numel() * t.element_size() for t in written.values())
    assert report.output == out and report.parameters_per_second > 0


def test_fuse_files_casts_floating_tensors_to_dtype(tmp_path: Path) -> None:
    model = Tiny(torch.float32)
    paths = _adapters(model, tmp_path / "adapters")
    base = _base_directory(model, tmp_path / "base", shard_size=None)
    report = fuse_files(base, paths, tmp_path / "out", dtype=torch.bfloat16)
    model.to(torch.bfloat16)
    fuse_model(model, [load_adapter(path, base=model.state_dict()) for path in paths])
    written = _read_dir(tmp_path / "out")
    _assert_same_bits(written, _snapshot(model))
    assert written["position_ids"].dtype == torch.int64
    kinds = {result.name: result.kind for result in report.layers}
    assert kinds["norm.weight"] == "cast" and kinds["position_ids"] == "unchanged"
    metadata = open_checkpoint(tmp_path / "out").metadata
    assert metadata["safemerge_dtype"] == "bfloat16"


def test_fuse_files_respects_the_shard_size(tmp_path: Path) -> None:
    model = Tiny()
    paths = _adapters(model, tmp_path / "adapters")
    base = _base_directory(model, tmp_path / "base", shard_size=None)
    report = fuse_files(base, paths, tmp_path / "out", shard_size=2048)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == report.shard_count > 3
    for shard in shards:
        tensors = load_file(tmp_path / "out" / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 2048 or len(tensors) == 1


@pytest.fixture
def on_disk(tmp_path: Path) -> tuple[Path, tuple[Path, Path]]:
    model = Tiny(torch.bfloat16)
    paths = _adapters(model, tmp_path / "adapters")
    return _base_directory(model, tmp_path / "base", shard_size=4000), paths


def test_an_existing_output_is_refused_before_anything_is_read(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, paths = on_disk
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    monkeypatch.setattr(streaming, "load_adapter", _never)
    with pytest.raises(ModelWriteError, match="already exists") as caught:
        fuse_files(base, paths, out)
    assert caught.value.reason == "exists"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("should not be called")


def test_an_output_over_an_input_is_refused(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]]
) -> None:
    base, paths = on_disk
    before = _digests(base)
    for output in (base, base / "merged", paths[0], tmp_path):
        with pytest.raises(ModelWriteError, match="would overlap input") as caught:
            fuse_files(base, paths, output, overwrite=True)
        assert caught.value.reason == "same-as-input"
    assert _digests(base) == before


def test_a_nan_adapter_writes_nothing(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]]
) -> None:
    base, _ = on_disk
    path = _nan_adapter(Tiny(torch.bfloat16), tmp_path / "nan", "layers.2.q")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteMergeError) as caught:
        fuse_files(base, [path], out)
    assert caught.value.layer == "layers.2.q.weight"
    notes = "\n".join(caught.value.__notes__)
    assert f"of {base}" in notes and f"nothing was written to {out}" in notes
    assert not out.exists() and leftover_temporaries(out) == []
    # With overwrite=True, the model already there stays as it was.
    write_model(out, {"old.weight": torch.zeros(2)})
    with pytest.raises(NonFiniteMergeError):
        fuse_files(base, [path], out, overwrite=True)
    assert list(_read_dir(out)) == ["old.weight"] and leftover_temporaries(out) == []


def test_misfitting_layers_are_all_refused_before_writing(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]]
) -> None:
    base, paths = on_disk
    model = Tiny(torch.bfloat16)
    dora = {
        f"{name}.weight": random_adapter(model.get_submodule(name), rank=2, dora=True)
        for name in ("layers.0.q", "layers.2.up")
    }
    dora_path = write_peft_adapter(tmp_path / "dora", dora)
    out = tmp_path / "out"
    with pytest.raises(ModelFuseError, match=r"2 layer\(s\) of .* cannot be fused") as caught:
        fuse_files(base, [paths[0], dora_path], out)
    assert caught.value.layers == ("layers.0.q.weight", "layers.2.up.weight")
    assert caught.value.path == base
    assert not out.exists() and leftover_temporaries(out) == []


def test_a_corrupt_config_is_refused_before_writing(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]]
) -> None:
    base, paths = on_disk
    (base / "config.json").write_text('{"model_type": "tiny", ')  # a cut-off download
    with pytest.raises(CheckpointError, match="is not valid JSON") as caught:
        fuse_files(base, paths, tmp_path / "out")
    assert caught.value.path == base / "config.json"
    assert not (tmp_path / "out").exists() and leftover_temporaries(tmp_path / "out") == []


def test_unexpected_errors_and_aborting_progress_write_nothing(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, paths = on_disk
    out = tmp_path / "out"

    def stop(result: TensorResult) -> None:
        if result.position == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fuse_files(base, paths, out, progress=stop)
    assert not out.exists() and leftover_temporaries(out) == []
    calls = _failing_fuse(monkeypatch, 3, MemoryError("out of memory"))
    with pytest.raises(ModelFuseError, match="failed with MemoryError: out of memory") as caught:
        fuse_files(base, paths, out)
    assert caught.value.layers == (calls[-1],) and caught.value.path == base
    assert not out.exists() and leftover_temporaries(out) == []


def test_a_fuse_outside_its_bound_is_refused(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, paths = on_disk
    monkeypatch.setattr(streaming.BoundCheck, "worst", lambda self, coefficients, fused: 1.5)
    with pytest.raises(ModelFuseError, match=r"1\.5 times its error bound") as caught:
        fuse_files(base, paths, tmp_path / "out")
    assert caught.value.layers == ("embed.weight",)
    assert not (tmp_path / "out").exists()


def test_no_room_on_disk_is_refused_up_front(
    tmp_path: Path, on_disk: tuple[Path, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, paths = on_disk

    class Usage:
        free = 1000

    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ModelWriteError, match="not enough disk space") as caught:
        fuse_files(base, paths, tmp_path / "out")
    assert caught.value.reason == "disk-space"


# -- transformers --------------------------------------------------------------------------


def _attention_adapter(model: nn.Module, directory: Path, *, rank: int) -> Path:
    layers = {
        name: random_adapter(module, rank=rank, alpha=2 * rank, std=0.05, seed=position)
        for position, (name, module) in enumerate(
            (f"{name}.weight", module)
            for name, module in model.named_modules()
            if name.endswith(("attention.self.query", "attention.self.value"))
        )
    }
    return write_peft_adapter(directory, layers)


def test_a_fused_bert_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    bert.save_pretrained(tmp_path / "base", safe_serialization=True)
    adapter = _attention_adapter(bert, tmp_path / "adapter", rank=4)
    report = fuse_files(tmp_path / "base", [adapter], tmp_path / "out")
    assert len(report.fused) == 4
    fuse_model(bert, [load_adapter(adapter, base=bert.state_dict())])
    loaded = transformers.BertModel.from_pretrained(tmp_path / "out").eval()
    expected = bert.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert (tmp_path / "out" / "config.json").exists()


def test_the_real_minilm_fused_loads_in_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minilm: Path
) -> None:
    base = minilm / "model"
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _digests(base)
    original = transformers.AutoModel.from_pretrained(base).eval()
    adapter = _attention_adapter(original, tmp_path / "adapter", rank=8)
    report = fuse_files(base, [adapter], tmp_path / "out")
    assert len(report.fused) == 12 and report.worst_error_of_bound <= 1
    fuse_model(original, [load_adapter(adapter, base=original.state_dict())])
    merged = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    fused = original.state_dict()
    merged_state = merged.state_dict()
    for block in range(6):
        for part in ("query", "value"):
            name = f"encoder.layer.{block}.attention.self.{part}.weight"
            assert torch.equal(merged_state[name], fused[name]), name
    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / name).read_bytes()
    assert _digests(base) == before


# -- killed mid-write ----------------------------------------------------------------------

#: The child fuses at a set pace (50 ms a tensor, over a second in all), so that the
#: signals below land midway however fast the fuse itself has become. It takes Ctrl-C as
#: a terminal's foreground process does, also where the test runner was started with
#: SIGINT ignored (a shell's background job), which its children would inherit.
_CHILD = """
import signal, sys, time, torch
from safemerge import fuse_files
signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(1)
print("start", flush=True)
fuse_files(
    sys.argv[1], [sys.argv[2]], sys.argv[3], shard_size=8 * 2**20,
    overwrite=sys.argv[4] == "1", progress=lambda result: time.sleep(0.05),
)
print("done", flush=True)
"""


def _big_model(directory: Path) -> tuple[Path, Path]:
    """About 100 MB of float32 projections in 24 tensors, an adapter on half of them."""
    layers = {f"layers.{i}.proj": random_layer("linear", 1024, 1024, seed=i) for i in range(24)}
    state = {f"{name}.weight": layer.weight.detach() for name, layer in layers.items()}
    base = directory / "base"
    write_model(base, state, shard_size=32 * 2**20)
    adapters = {
        f"{name}.weight": random_adapter(layer, rank=8, seed=i)
        for i, (name, layer) in enumerate(layers.items())
        if i % 2 == 0
    }
    return base, write_peft_adapter(directory / "adapter", adapters)


def _run_child(
    base: Path, adapter: Path, out: Path, *, overwrite: bool = False
) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(base),
            str(adapter),
            str(out),
            "1" if overwrite else "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "start"
    return child


def _complete_or_absent(out: Path, expected: dict[str, torch.Tensor]) -> str:
    """``"absent"`` or ``"complete"``; fails for anything in between."""
    for leftover in leftover_temporaries(out):  # what a later run would report and clean
        assert ".safemerge-tmp-" in leftover.name or not out.exists()
    if not out.exists():
        return "absent"
    written = _read_dir(out)
    _assert_same_bits(written, expected)
    return "complete"


def test_a_killed_fuse_leaves_nothing_or_a_complete_model(tmp_path: Path) -> None:
    base, adapter = _big_model(tmp_path)
    with pinned_threads(1):
        fuse_files(base, [adapter], tmp_path / "reference", shard_size=8 * 2**20)
    expected = _read_dir(tmp_path / "reference")
    # SIGKILL at several moments: from before the first shard to after the rename.
    outcomes = []
    for delay in (0.0, 0.3, 0.7):
        out = tmp_path / f"out-{delay}"
        child = _run_child(base, adapter, out)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.communicate()
        outcomes.append(_complete_or_absent(out, expected))
    assert outcomes[0] == "absent", outcomes
    # Ctrl-C: KeyboardInterrupt unwinds, removing the temporary directory.
    out = tmp_path / "interrupted"
    child = _run_child(base, adapter, out)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate()
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr
    assert not out.exists() and leftover_temporaries(out) == []
    # Over an existing model: the old one, or the new one complete, never a mix.
    out = tmp_path / "out"
    write_model(out, {"old.weight": torch.zeros(4)})
    child = _run_child(base, adapter, out, overwrite=True)
    time.sleep(0.4)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    if not out.exists():  # killed between the two renames: the old model is aside
        assert any(".safemerge-old-" in p.name for p in leftover_temporaries(out))
    elif sorted(_read_dir(out)) != ["old.weight"]:
        _assert_same_bits(_read_dir(out), expected)
    child = _run_child(base, adapter, out, overwrite=True)
    assert child.wait(timeout=120) == 0
    _assert_same_bits(_read_dir(out), expected)
    assert not any(".safemerge-old-" in p.name for p in leftover_temporaries(out))
