"""safemerge.writer and ShardWriter: streamed shards, the index, all or nothing on disk."""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from safemerge import CheckpointError, ModelWriteError, WrittenModel, open_checkpoint, write_model
from safemerge.io.atomic import start_writeback
from safemerge.io.checkpoint import INDEX_NAME, SINGLE_NAME
from safemerge.io.shard_writer import ShardWriter
from safemerge.io.writer import is_weight_file, leftover_temporaries, plan_shards
from safemerge.model.memory import release_free_heap

# Mixed element sizes (odd element counts), so alignment in the data section is exercised.
MIXED = {
    "a.weight": torch.arange(7, dtype=torch.bfloat16),
    "b.weight": torch.linspace(-1, 1, 15, dtype=torch.float32).reshape(3, 5),
    "c.ids": torch.arange(3, dtype=torch.int64),
    "d.mask": torch.tensor([True, False, True]),
    "e.scale": torch.tensor(2.5, dtype=torch.float16),
    "f.empty": torch.zeros(0, 4),
    "g.fp8": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
}


def _model(count: int = 6, numel: int = 100, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {
        f"layers.{i}.weight": torch.arange(numel, dtype=torch.float32).to(dtype) + i
        for i in range(count)
    }


def _equal(left: torch.Tensor, right: torch.Tensor) -> bool:
    if left.dtype != right.dtype or left.shape != right.shape:
        return False
    if left.dtype.itemsize == 1 and left.is_floating_point():
        return torch.equal(left.view(torch.uint8), right.view(torch.uint8))
    return torch.equal(left, right)


def _loaded(directory: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(directory) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint}


def _assert_nothing_left(directory: Path) -> None:
    assert not directory.exists()
    assert leftover_temporaries(directory) == []


def _data_offsets(file: Path) -> list[tuple[int, int, torch.dtype]]:
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    sizes = {"BF16": 2, "F32": 4, "I64": 8, "BOOL": 1, "F16": 2, "F8_E4M3": 1}
    return [
        (8 + length + e["data_offsets"][0], sizes[e["dtype"]], e["dtype"]) for e in header.values()
    ]


# -- ShardWriter ---------------------------------------------------------------------------


def test_shard_writer_takes_tensors_in_any_order_and_safetensors_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    entries = [(name, tensor.shape, tensor.dtype) for name, tensor in MIXED.items()]
    with ShardWriter(path, entries, {"format": "pt", "note": "hi"}) as shard:
        for name in reversed(list(MIXED)):
            shard.write(name, MIXED[name])
    loaded = load_file(path)
    assert set(loaded) == set(MIXED)
    for name, tensor in MIXED.items():
        assert _equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "hi"}
    # Every tensor starts at a multiple of its element size (in the file, header included).
    for offset, size, dtype in _data_offsets(path):
        assert offset % size == 0, dtype
    assert path.stat().st_size == shard.file_bytes


def test_shard_writer_refuses_what_the_plan_does_not_say(tmp_path: Path) -> None:
    entries = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    shard = ShardWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(KeyError, match="'c' is not planned"):
        shard.write("c", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"'a' is torch.float16 \(2, 3\) but .* header says"):
        shard.write("a", torch.zeros(2, 3, dtype=torch.float16))
    shard.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="already written"):
        shard.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"incomplete: 1 tensor\(s\) not written \('b'\)"):
        shard.close()
    assert shard.missing == ("b",)
    shard.abort()
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match="listed twice"):
        ShardWriter(tmp_path / "y.safetensors", [*entries, entries[0]])
    with pytest.raises(TypeError, match="metadata maps str to str"):
        ShardWriter(tmp_path / "z.safetensors", entries, {"n": 1})  # type: ignore[dict-item]


# -- write_model: layout -------------------------------------------------------------------


def test_a_model_that_fits_one_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = write_model(out, MIXED, metadata={"origin": "test"})
    assert isinstance(written, WrittenModel)
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_NAME]
    assert written.files == (out / SINGLE_NAME,) and written.index is None
    assert written.shard_count == 1 and written.tensors == len(MIXED)
    loaded = _loaded(out)
    assert list(loaded) == list(MIXED)  # header order is plan order
    assert all(_equal(loaded[name], tensor) for name, tensor in MIXED.items())
    with safe_open(str(out / SINGLE_NAME), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "origin": "test"}
    assert (out / SINGLE_NAME).stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("background", [False, True])
def test_shards_follow_the_size_limit_and_the_index_lists_every_tensor(
    tmp_path: Path, background: bool
) -> None:
    tensors = _model(count=7, numel=100)  # 400 bytes each
    tensors["big.weight"] = torch.ones(300)  # 1200 bytes: over the limit, a shard of its own
    tensors["tail.weight"] = torch.ones(10)
    out = tmp_path / "out"
    written = write_model(out, tensors, shard_size=1000, background=background)
    # Shards fill in order: 2 + 2 + 2 + 1 layers (the 8th would pass 1000), big alone, tail.
    assert written.shard_count == 6
    names = [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, INDEX_NAME])
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"] == {"total_size": 7 * 400 + 1200 + 40}
    assert written.total_size == index["metadata"]["total_size"]
    assert list(index["weight_map"]) == list(tensors)
    assert index["weight_map"]["big.weight"] == names[4]
    for name in names:
        shard = load_file(out / name)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 1000 or len(shard) == 1
        assert all(index["weight_map"][key] == name for key in shard)
    loaded = _loaded(out)
    assert list(loaded) == list(tensors)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_plan_shards_packs_like_transformers() -> None:
    plan = [("a", (100,), torch.float32), ("b", (100,), torch.float32), ("c", (1,), torch.float32)]
    assert [len(s) for s in plan_shards("m", plan, 800)] == [2, 1]
    assert [len(s) for s in plan_shards("m", plan, 804)] == [3]
    assert [len(s) for s in plan_shards("m", plan, 10)] == [1, 1, 1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ModelWriteError, match="shard_size must be a positive") as caught:
            plan_shards("m", plan, bad)  # type: ignore[arg-type]
        assert caught.value.reason == "bad-plan"
    with pytest.raises(ModelWriteError, match="'a' appears twice") as caught:
        plan_shards("m", [*plan, plan[0]], 800)
    assert caught.value.key == "a"
    with pytest.raises(ModelWriteError, match="plan lists no tensors"):
        plan_shards("m", [], 800)


def test_tensors_stream_through_one_at_a_time(tmp_path: Path) -> None:
    tensors = _model(count=8, numel=1000)
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    alive: list[weakref.ref[torch.Tensor]] = []
    held: list[int] = []

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name in tensors:
            gc.collect()
            held.append(sum(ref() is not None for ref in alive))
            tensor = tensors[name].clone()
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    write_model(tmp_path / "out", produce(), plan=plan, shard_size=8000)
    # When each tensor is produced, none of the earlier ones is still held by the writer.
    assert held == [0] * len(tensors)
    loaded = _loaded(tmp_path / "out")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_background_writes_hold_at_most_one_tensor_more(tmp_path: Path) -> None:
    tensors = _model(count=8, numel=1000)
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    alive: list[weakref.ref[torch.Tensor]] = []
    held: list[int] = []

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name in tensors:
            gc.collect()
            held.append(sum(ref() is not None for ref in alive))
            tensor = tensors[name].clone()
            alive.append(weakref.ref(tensor))
            yield name, tensor
            del tensor

    write_model(tmp_path / "out", produce(), plan=plan, shard_size=8000, background=True)
    # At most the one tensor being written while the next is produced.
    assert max(held) <= 1
    loaded = _loaded(tmp_path / "out")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_background_write_that_fails_raises_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ShardWriter.write
    calls: list[str] = []

    def failing(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        write_model(out, _model(count=6), shard_size=1000, background=True)
    _assert_nothing_left(out)


def test_a_failing_producer_waits_for_the_write_in_flight_before_closing_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_write, original_abort = ShardWriter.write, ShardWriter.abort
    events: list[str] = []

    def slow(self: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        time.sleep(0.2)
        original_write(self, name, tensor)
        events.append(f"wrote {name}")

    def abort(self: ShardWriter) -> None:
        events.append("abort")
        original_abort(self)

    monkeypatch.setattr(ShardWriter, "write", slow)
    monkeypatch.setattr(ShardWriter, "abort", abort)

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        yield "a", torch.zeros(2)
        raise RuntimeError("boom")  # while "a" is still being written

    out = tmp_path / "out"
    plan = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(RuntimeError, match="boom"):
        write_model(out, produce(), plan=plan, background=True)
    assert events == ["wrote a", "abort"]
    _assert_nothing_left(out)


def test_start_writeback_leaves_the_bytes_as_written(tmp_path: Path) -> None:
    path = tmp_path / "file"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(descriptor, b"0123456789")
        start_writeback(descriptor, 2, 5)
        start_writeback(descriptor, 0, 0)  # nothing to do
    finally:
        os.close(descriptor)
    assert path.read_bytes() == b"0123456789"


# -- write_model: all or nothing -----------------------------------------------------------


def test_an_existing_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelWriteError, match="already exists; refusing") as caught:
        write_model(out, MIXED)
    assert caught.value.reason == "exists" and caught.value.path == out
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ModelWriteError, match="not a directory") as caught:
        write_model(file, MIXED, overwrite=True)
    assert file.read_text() == "x"


def test_overwrite_replaces_the_old_model_only_once_the_new_one_is_complete(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    write_model(out, {"old.weight": torch.zeros(3)})

    def failing() -> Iterator[tuple[str, torch.Tensor]]:
        yield "new.weight", torch.ones(3)
        raise RuntimeError("producer broke")

    plan = [("new.weight", (3,), torch.float32), ("more.weight", (3,), torch.float32)]
    with pytest.raises(RuntimeError, match="producer broke"):
        write_model(out, failing(), plan=plan, overwrite=True)
    assert list(_loaded(out)) == ["old.weight"]
    assert leftover_temporaries(out) == []
    write_model(out, {"new.weight": torch.ones(3)}, overwrite=True)
    assert list(_loaded(out)) == ["new.weight"]
    assert leftover_temporaries(out) == []


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("exception", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_while_producing_leaves_nothing(
    tmp_path: Path, exception: BaseException, background: bool
) -> None:
    tensors = _model(count=6)
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for position, (name, tensor) in enumerate(tensors.items()):
            if position == 4:
                raise exception
            yield name, tensor

    out = tmp_path / "deeper" / "out"
    with pytest.raises(type(exception)):
        write_model(
            out, produce(), plan=plan, shard_size=500, copy_from=None, background=background
        )
    _assert_nothing_left(out)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("produced", "fragment"),
    [
        ([("b", torch.zeros(2))], "'b' came where the plan has 'a'"),
        (
            [("a", torch.zeros(3))],
            r"'a' is torch.float32 \(3,\) but the plan says torch.float32 \(2,\)",
        ),
        ([("a", torch.zeros(2, dtype=torch.float16))], "is torch.float16"),
        ([("a", torch.zeros(2))], "'b' was planned but never produced"),
        (
            [("a", torch.zeros(2)), ("b", torch.zeros(2)), ("c", torch.zeros(2))],
            "'c' was produced after every planned tensor",
        ),
        ([("a", [0.0, 0.0])], "'a' is a list, not a tensor"),
    ],
)
@pytest.mark.parametrize("background", [False, True])
def test_tensors_that_differ_from_the_plan_are_refused(
    tmp_path: Path, produced: list[tuple[str, Any]], fragment: str, background: bool
) -> None:
    plan = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    out = tmp_path / "out"
    with pytest.raises(ModelWriteError, match=fragment) as caught:
        write_model(out, iter(produced), plan=plan, background=background)
    assert caught.value.reason == "plan-mismatch"
    assert caught.value.path == out
    _assert_nothing_left(out)


def test_leftover_temporaries_are_found_by_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.safemerge-tmp-1234abcd").mkdir()
    (tmp_path / ".out.safemerge-old-5678").mkdir()
    (tmp_path / ".other.safemerge-tmp-1").mkdir()
    assert [p.name for p in leftover_temporaries(out)] == [
        ".out.safemerge-old-5678",
        ".out.safemerge-tmp-1234abcd",
    ]
    assert leftover_temporaries(tmp_path / "missing" / "out") == []


# -- write_model: the other files of a model directory -------------------------------------


def test_other_files_are_copied_and_weight_files_are_not(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "1_Pooling").mkdir(parents=True)
    (base / ".git").mkdir()
    (base / "onnx").mkdir()
    copied = {
        "config.json": '{"model_type": "bert"}',
        "tokenizer.json": "{}",
        "tokenizer_config.json": "{}",
        "generation_config.json": "{}",
        "vocab.txt": "a\nb\n",
        "README.md": "# base",
        ".gitattributes": "*.bin lfs",
        "1_Pooling/config.json": "{}",
    }
    skipped = {
        "model.safetensors": "old",
        "model-00001-of-00002.safetensors": "old",
        "model.safetensors.index.json": "{}",
        "pytorch_model.bin": "pickle",
        "pytorch_model.bin.index.json": "{}",
        "tf_model.h5": "h5",
        "flax_model.msgpack": "m",
        "onnx/model.onnx": "o",
        ".git/config": "git",
    }
    for name, text in {**copied, **skipped}.items():
        (base / name).write_text(text)
    out = tmp_path / "out"
    written = write_model(out, {"w.weight": torch.ones(2)}, copy_from=base)
    assert sorted(written.copied) == sorted(copied)
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == sorted([*copied, SINGLE_NAME])
    for name, text in copied.items():
        assert (out / name).read_text() == text
    assert is_weight_file("Model-00001-of-00002.SAFETENSORS") and not is_weight_file("vocab.txt")


def _base_with_files(base: Path) -> None:
    (base / "tokenizer").mkdir(parents=True)
    (base / "config.json").write_text('{"old": true}')
    (base / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (base / "model.safetensors").write_text("old weights")


def test_extra_files_are_added_and_replace_copied_ones(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _base_with_files(base)
    out = tmp_path / "out"
    extra = {"config.json": b'{"new": true}\n', "sub/dir/notes.txt": b"added"}
    written = write_model(out, {"w.weight": torch.ones(2)}, copy_from=base, extra_files=extra)
    assert written.copied == ("tokenizer/vocab.txt",)  # config.json is not the base's
    assert written.added == ("config.json", "sub/dir/notes.txt")
    for name, payload in extra.items():
        assert (out / name).read_bytes() == payload
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == sorted([SINGLE_NAME, "tokenizer/vocab.txt", *extra])
    assert (base / "config.json").read_text() == '{"old": true}'  # inputs only read


def test_an_extra_file_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _base_with_files(base)
    out = tmp_path / "out"
    # "tokenizer" is a folder copied from the base: the file cannot take its place.
    with pytest.raises(IsADirectoryError):
        write_model(
            out, {"w.weight": torch.ones(2)}, copy_from=base, extra_files={"tokenizer": b"x"}
        )
    _assert_nothing_left(out)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["base"]


def test_an_extra_file_that_fails_keeps_the_old_model_on_overwrite(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _base_with_files(base)
    out = tmp_path / "out"
    write_model(out, {"w.weight": torch.ones(2)}, extra_files={"config.json": b"{}"})
    with pytest.raises(IsADirectoryError):
        write_model(
            out,
            {"w.weight": torch.zeros(2)},
            copy_from=base,
            extra_files={"tokenizer": b"x"},
            overwrite=True,
        )
    assert (out / "config.json").read_bytes() == b"{}"
    assert torch.equal(_loaded(out)["w.weight"], torch.ones(2))
    assert leftover_temporaries(out) == []


@pytest.mark.parametrize(
    "name",
    ["../escape.json", "/abs.json", "a//b.json", "./config.json", ".hidden/x", "model.safetensors",
     "sub/model.safetensors.index.json", ""],
)  # fmt: skip
def test_an_extra_file_outside_the_model_or_among_its_weights_is_refused(
    tmp_path: Path, name: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ModelWriteError, match="extra file") as caught:
        write_model(out, {"w.weight": torch.ones(2)}, extra_files={name: b"x"})
    assert caught.value.reason == "bad-plan" and caught.value.key == name
    _assert_nothing_left(out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sharded", [False, True])
def test_the_weights_stem_names_the_weight_files_and_the_index(
    tmp_path: Path, sharded: bool
) -> None:
    stem = "diffusion_pytorch_model"
    out = tmp_path / "unet"
    written = write_model(out, _model(), shard_size=800 if sharded else 10**6, weights_stem=stem)
    names = sorted(p.name for p in out.iterdir())
    if sharded:
        shards = [f"{stem}-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
        assert names == sorted([*shards, f"{stem}.safetensors.index.json"])
        assert written.index == out / f"{stem}.safetensors.index.json"
        index = json.loads(written.index.read_text())
        assert set(index["weight_map"].values()) == set(shards)
    else:
        assert names == [f"{stem}.safetensors"] and written.index is None
    assert [p.name for p in written.files] == [n for n in names if not n.endswith(".json")]
    assert all(torch.equal(t, _model()[n]) for n, t in _loaded_files(written.files).items())


@pytest.mark.parametrize("stem", ["", ".model", "a/b", "../model"])
def test_a_weights_stem_that_is_no_plain_name_is_refused(tmp_path: Path, stem: str) -> None:
    with pytest.raises(ModelWriteError, match="weights_stem") as caught:
        write_model(tmp_path / "out", {"w.weight": torch.ones(2)}, weights_stem=stem)
    assert caught.value.reason == "bad-plan"
    assert list(tmp_path.iterdir()) == []


def _loaded_files(files: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


# -- files: reading without a memory map ---------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_unmapped_reads_equal_mapped_ones(tmp_path: Path, sharded: bool) -> None:
    out = tmp_path / "m"
    write_model(out, MIXED, shard_size=20 if sharded else 10**6)
    with open_checkpoint(out) as checkpoint:
        for name, tensor in MIXED.items():
            read = checkpoint.read(name, mapped=False)
            assert _equal(read, checkpoint.read(name)) and _equal(read, tensor), name
            assert read.untyped_storage().nbytes() == read.nbytes  # a storage of its own


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_unmapped_reads_leave_no_map_and_no_resident_pages(tmp_path: Path) -> None:
    tensors = {f"big{i}": torch.full((2_000_000,), float(i)) for i in range(4)}  # 32 MB
    write_model(tmp_path / "m", tensors, shard_size=8_000_000)

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def mapped() -> bool:
        return str(tmp_path / "m") in Path("/proc/self/maps").read_text()

    with open_checkpoint(tmp_path / "m") as checkpoint:
        release_free_heap()  # freed heap blocks stay resident otherwise (glibc)
        before = resident()
        for name in tensors:
            tensor = checkpoint.read(name, mapped=False)
            assert float(tensor[0]) == float(name[-1])
            del tensor
            release_free_heap()
            assert not mapped()
        assert resident() - before < 12_000_000  # one 8 MB tensor at a time, not 32 MB


def test_an_unmapped_read_of_a_file_changed_since_opening_is_refused(tmp_path: Path) -> None:
    write_model(tmp_path / "m", MIXED)
    file = tmp_path / "m" / SINGLE_NAME
    with open_checkpoint(tmp_path / "m") as checkpoint:
        file.write_bytes(file.read_bytes()[:-3])
        with pytest.raises(CheckpointError, match=r"not the .* it had when opened") as caught:
            checkpoint.read("b.weight", mapped=False)
    assert caught.value.reason == "corrupt" and caught.value.key == "b.weight"
    assert caught.value.path == file


def test_a_ctrl_c_while_the_last_write_finishes_is_raised_once_it_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The background write in flight always finishes (the file must not close under it);
    a Ctrl-C meanwhile is held, then raised, also on the way out of a complete stream."""
    from safemerge.io import writer as writer_module
    from safemerge.merge import engine

    finished: list[str] = []

    class SlowShard:
        def write(self, name: str, tensor: torch.Tensor) -> None:
            time.sleep(0.1)
            finished.append(name)

    real_wait = engine.futures_wait
    interrupts = [KeyboardInterrupt()]

    def interrupted_once(futures: Any) -> Any:
        if interrupts:
            raise interrupts.pop()
        return real_wait(futures)

    monkeypatch.setattr(engine, "futures_wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt), writer_module._Handoff(background=True) as handoff:
        handoff.write(SlowShard(), "t", torch.zeros(4))  # type: ignore[arg-type]
    assert finished == ["t"] and not interrupts
