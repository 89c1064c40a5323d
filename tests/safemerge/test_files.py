"""safemerge.files: lazy checkpoints, single and sharded, every refusal, and atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import safemerge.io.atomic as atomic
import safemerge.io.checkpoint as files
from safemerge import Checkpoint, CheckpointError, TensorInfo, open_checkpoint
from safemerge.io.atomic import save_tensors
from safemerge.io.checkpoint import read_tensors

MODEL = {
    "embed.weight": torch.arange(40, dtype=torch.float32).reshape(10, 4),
    "layer.0.q.weight": torch.full((4, 4), 0.5, dtype=torch.bfloat16),
    "layer.0.q.bias": torch.ones(4, dtype=torch.float16),
    "position_ids": torch.arange(7, dtype=torch.int64),
}


def _header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header: dict[str, Any] = json.loads(data[8 : 8 + length])
    return header


def _raw_file(path: Path, header: dict[str, Any], data: bytes) -> Path:
    """A safetensors file written by hand, to say whatever a test needs it to say."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _sharded(directory: Path, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    directory.mkdir(exist_ok=True)
    weight_map = {}
    for shard, tensors in shards.items():
        save_tensors(directory / shard, tensors, {"format": "pt", "shard": shard})
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / files.INDEX_NAME).write_text(json.dumps(index))
    return directory


def _refusal(path: Path, reason: str, *fragments: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    error = caught.value
    assert error.reason == reason, str(error)
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in: {error}"
    return error


# -- reading ---------------------------------------------------------------------------------


def test_single_file_names_shapes_dtypes_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors(path, MODEL, {"format": "pt", "note": "x"})
    with open_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, Checkpoint)
        assert checkpoint.path == path
        header_order = tuple(name for name in _header(path) if name != "__metadata__")
        assert checkpoint.names == header_order
        assert set(checkpoint.names) == set(MODEL)
        assert list(checkpoint) == list(checkpoint.names)
        assert len(checkpoint) == 4 and "embed.weight" in checkpoint and "nope" not in checkpoint
        assert checkpoint.metadata == {"format": "pt", "note": "x"}
        assert checkpoint.info("layer.0.q.weight") == TensorInfo(
            "layer.0.q.weight", (4, 4), torch.bfloat16, path, 32
        )
        assert checkpoint.total_bytes == sum(t.nbytes for t in MODEL.values())
        for name, tensor in MODEL.items():
            read = checkpoint.read(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor)
        with pytest.raises(KeyError, match="no tensor named 'nope' in checkpoint"):
            checkpoint.read("nope")
    with pytest.raises(ValueError, match="is closed"):
        checkpoint.read("embed.weight")


def test_directory_with_model_safetensors(tmp_path: Path) -> None:
    save_tensors(tmp_path / "model.safetensors", MODEL)
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.path == tmp_path
        assert checkpoint.info("embed.weight").file == tmp_path / "model.safetensors"
        assert torch.equal(checkpoint.read("position_ids"), MODEL["position_ids"])


def test_sharded_checkpoint_in_index_order(tmp_path: Path) -> None:
    directory = _sharded(
        tmp_path / "model",
        {
            "model-00001-of-00002.safetensors": {"b.weight": torch.ones(2, 3)},
            "model-00002-of-00002.safetensors": {"a.weight": torch.zeros(5), "c": torch.ones(1)},
        },
    )
    with open_checkpoint(str(directory)) as checkpoint:
        assert checkpoint.names == ("b.weight", "a.weight", "c")
        assert checkpoint.info("a.weight").file == directory / "model-00002-of-00002.safetensors"
        assert checkpoint.files == (
            directory / "model-00001-of-00002.safetensors",
            directory / "model-00002-of-00002.safetensors",
        )
        # Shards' metadata merged, the first shard's value winning.
        assert checkpoint.metadata == {"format": "pt", "shard": "model-00001-of-00002.safetensors"}
        assert torch.equal(checkpoint.read("b.weight"), torch.ones(2, 3))
        assert torch.equal(checkpoint.read("a.weight"), torch.zeros(5))
        assert checkpoint.total_bytes == 4 * (6 + 5 + 1)
    with open_checkpoint(directory / files.INDEX_NAME) as checkpoint:
        assert checkpoint.path == directory and len(checkpoint) == 3


def test_read_returns_a_copy_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"a": torch.ones(1000), "b": torch.ones(1000)})
    with open_checkpoint(path) as checkpoint:
        a = checkpoint.read("a")
        # Storage of its own, exactly its size: not a view into a map of the whole file.
        assert a.untyped_storage().nbytes() == a.nbytes
        a += 1
        assert torch.equal(checkpoint.read("a"), torch.ones(1000))
    save_tensors(path, {"a": torch.zeros(1000), "b": torch.zeros(1000)})
    assert torch.equal(a, torch.full((1000,), 2.0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_reading_one_tensor_maps_one_shard_and_reads_little(tmp_path: Path) -> None:
    shards = {
        f"s{i}.safetensors": {f"big{i}": torch.ones(2_000_000), f"small{i}": torch.ones(64)}
        for i in range(4)
    }  # 32 MB of tensor data in all
    directory = _sharded(tmp_path / "model", shards)

    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def mapped_shards() -> set[str]:
        maps = Path("/proc/self/maps").read_text().splitlines()
        return {Path(line.split()[-1]).name for line in maps if str(directory) in line}

    before = resident()
    with open_checkpoint(directory) as checkpoint:
        assert mapped_shards() == set()  # opening reads headers only
        small = checkpoint.read("small2")
        assert torch.equal(small, torch.ones(64))
        assert mapped_shards() == {"s2.safetensors"}
        assert resident() - before < 8_000_000  # far less than the 32 MB model
    assert mapped_shards() == set()


def test_read_tensors_gives_tensors_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_tensors(path, MODEL, {"k": "v"})
    tensors, metadata = read_tensors(path)
    assert metadata == {"k": "v"}
    assert tensors.keys() == MODEL.keys()
    assert all(torch.equal(tensors[name], MODEL[name]) for name in MODEL)


def test_real_model_opened_lazily(minilm: Path) -> None:
    path = minilm / "model" / "model.safetensors"
    with open_checkpoint(path) as checkpoint:
        assert len(checkpoint) == 104
        query = checkpoint.info("encoder.layer.0.attention.self.query.weight")
        assert (query.shape, query.dtype, query.nbytes) == (
            (384, 384),
            torch.float32,
            384 * 384 * 4,
        )
        assert checkpoint.info("embeddings.position_ids").dtype == torch.int64
        assert checkpoint.info("embeddings.word_embeddings.weight").shape == (30522, 384)
        weight = checkpoint.read("encoder.layer.0.attention.self.query.weight")
        assert weight.shape == (384, 384) and torch.isfinite(weight).all()


# -- refusals --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    error = _refusal(
        tmp_path / "nowhere", "missing", "no such file or directory", "pass a .safetensors file"
    )
    assert error.path == tmp_path / "nowhere"


def test_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    _refusal(tmp_path, "no-safetensors", "has no .safetensors file", "model.safetensors")


def test_directory_with_several_unindexed_files(tmp_path: Path) -> None:
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(1)})
    save_tensors(tmp_path / "b.safetensors", {"y": torch.ones(1)})
    _refusal(tmp_path, "ambiguous", "a.safetensors, b.safetensors", "pass the file")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickled_suffixes_refused_with_the_conversion(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pytorch_model{suffix}"
    save_tensors(path, {"x": torch.ones(1)})  # even safetensors bytes: the name says pickle
    _refusal(
        path,
        "pickled",
        "pickled PyTorch checkpoint",
        f"ends in {suffix}",
        "never unpickles",
        "torch.load(path, weights_only=True)",
        "safetensors.torch.save_file",
    )


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("writer", ["zip", "legacy", "pickle"])
def test_pickle_bytes_refused_without_unpickling(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
        kind = "pickle protocol marker"
    else:
        torch.save({"x": torch.ones(2)}, path, _use_new_zipfile_serialization=writer == "zip")
        kind = "zip archive" if writer == "zip" else "pickle protocol marker"
    _refusal(path, "pickled", kind, "never unpickles")
    _refusal(tmp_path, "pickled", kind)
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_tensors(path)
    assert not marker.exists()


def test_directory_of_pickles_refused(tmp_path: Path) -> None:
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    _refusal(
        tmp_path, "pickled", "only pickled checkpoints (pytorch_model.bin)", "weights_only=True"
    )


def test_truncated_file_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors(path, MODEL)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    error = _refusal(path, "truncated", "is truncated", "but only", "re-download")
    assert error.path == path
    path.write_bytes(data[:20])  # cut inside the header
    _refusal(path, "truncated", "its header needs")
    path.write_bytes(data[:5])
    _refusal(path, "truncated", "less than the 8-byte header length")


@pytest.mark.parametrize(
    ("header", "data", "reason", "fragment"),
    [
        (  # the header promises more bytes than the tensor's shape needs
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}},
            b"\0" * 12,
            "corrupt",
            "needs 8 bytes but its data offsets [0, 12) span 12",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "corrupt",
            "overlaps the tensor before",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 16,
            "corrupt",
            "8 bytes follow the last tensor",
        ),
        (  # a header claiming data the file does not have
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 8,
            "truncated",
            "places 16 bytes of tensor data but only 8",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "corrupt",
            "has shape [-1]",
        ),
        (
            {"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "corrupt",
            "__metadata__ is not a mapping of strings",
        ),
    ],
)
def test_lying_headers_refused_at_open(
    tmp_path: Path, header: dict[str, Any], data: bytes, reason: str, fragment: str
) -> None:
    path = _raw_file(tmp_path / "m.safetensors", header, data)
    error = _refusal(path, reason, fragment, str(path), "re-download or re-copy it")
    named = fragment.startswith(("needs", "overlaps", "has shape"))
    assert error.key == ("b" if "overlaps" in fragment else "a" if named else None)


def test_unknown_dtype_refused(tmp_path: Path) -> None:
    header = {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}
    path = _raw_file(tmp_path / "m.safetensors", header, b"\0")
    error = _refusal(
        path, "unsupported-dtype", "tensor 'a'", "has dtype 'Q4'", "convert the tensor"
    )
    assert error.key == "a"


def test_junk_and_bad_json_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    _refusal(junk, "corrupt", "header length field reads", "not a safetensors file")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    _refusal(bad, "corrupt", "header is not valid JSON")
    twice = tmp_path / "twice.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    text = f'{{"a": {entry}, "a": {entry}}}'.encode()
    twice.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    _refusal(twice, "corrupt", "key 'a' appears twice")


def test_file_damaged_after_open_fails_on_read_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_tensors(path, MODEL)
    checkpoint = open_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is truncated, corrupt or unreadable") as caught:
        checkpoint.read("embed.weight")
    assert caught.value.path == path


def _two_shards(directory: Path) -> Path:
    return _sharded(
        directory,
        {"s1.safetensors": {"a": torch.ones(2)}, "s2.safetensors": {"b": torch.ones(3)}},
    )


def _rewrite_index(directory: Path, **weight_map: str) -> None:
    (directory / files.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    ("shard", "fragment"),
    [
        ("/etc/passwd", "it is an absolute path"),
        ("../outside.safetensors", "climbs out of the directory with '..'"),
        ("sub/../../outside.safetensors", "climbs out of the directory"),
        ("C:\\models\\x.safetensors", "it is an absolute path"),
    ],
)
def test_index_entry_outside_the_directory_refused(
    tmp_path: Path, shard: str, fragment: str
) -> None:
    directory = _two_shards(tmp_path / "model")
    save_tensors(tmp_path / "outside.safetensors", {"b": torch.ones(3)})
    _rewrite_index(directory, a="s1.safetensors", b=shard)
    error = _refusal(directory, "unsafe-path", fragment, repr(shard), "tensor 'b'", "refusing")
    assert error.key == "b"


def test_index_entry_linked_outside_the_directory_refused(tmp_path: Path) -> None:
    directory = _two_shards(tmp_path / "model")
    save_tensors(tmp_path / "elsewhere.safetensors", {"b": torch.ones(3)})
    (directory / "s2.safetensors").unlink()
    (directory / "s2.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    _refusal(directory, "unsafe-path", "through a symbolic link", "outside the directory")


def test_links_inside_the_directory_and_into_the_hub_cache_blobs_are_fine(tmp_path: Path) -> None:
    directory = _two_shards(tmp_path / "model")
    (directory / "real.safetensors").write_bytes((directory / "s2.safetensors").read_bytes())
    (directory / "s2.safetensors").unlink()
    (directory / "s2.safetensors").symlink_to("real.safetensors")
    with open_checkpoint(directory) as checkpoint:
        assert checkpoint.info("b").file == directory / "s2.safetensors"
        assert torch.equal(checkpoint.read("b"), torch.ones(3))
    (directory / "real.safetensors").rename(tmp_path / "real.safetensors")
    (directory / "s2.safetensors").unlink()
    # Hugging Face's cache: snapshots/<revision>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, blob in (("s1.safetensors", "h1"), ("s2.safetensors", "h2")):
        source = directory / name if name == "s1.safetensors" else tmp_path / "real.safetensors"
        source.rename(repo / "blobs" / blob)
        (snapshot / name).symlink_to(Path("../../blobs") / blob)
    (directory / files.INDEX_NAME).rename(snapshot / files.INDEX_NAME)
    with open_checkpoint(snapshot) as checkpoint:
        assert checkpoint.names == ("a", "b")
        assert torch.equal(checkpoint.read("b"), torch.ones(3))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    directory = _two_shards(tmp_path / "model")
    (directory / "s2.safetensors").unlink()
    error = _refusal(
        directory, "missing-shard", "lists shard 's2.safetensors'", "download the missing shard"
    )
    assert error.key == "b"


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    directory = _two_shards(tmp_path / "model")
    _rewrite_index(directory, a="s1.safetensors", b="s1.safetensors")
    error = _refusal(
        directory,
        "missing-tensor",
        "tensor 'b' is in shard 's1.safetensors'",
        "regenerate the index",
    )
    assert error.key == "b"


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    directory = _sharded(
        tmp_path / "model",
        {
            "s1.safetensors": {"a": torch.ones(2)},
            "s2.safetensors": {"a": torch.zeros(2), "b": torch.ones(1)},
        },
    )
    _rewrite_index(directory, a="s1.safetensors", b="s2.safetensors")
    error = _refusal(
        directory,
        "duplicate",
        "tensor 'a' is stored in two shards",
        "'s1.safetensors' and 's2.safetensors'",
    )
    assert error.key == "a"


def test_shard_tensor_missing_from_the_index(tmp_path: Path) -> None:
    directory = _sharded(
        tmp_path / "model",
        {
            "s1.safetensors": {"a": torch.ones(2), "c": torch.ones(1)},
            "s2.safetensors": {"b": torch.ones(3)},
        },
    )
    _rewrite_index(directory, a="s1.safetensors", b="s2.safetensors")
    error = _refusal(directory, "unlisted-tensor", "holds tensor 'c', which index", "does not list")
    assert error.key == "c"


def test_bad_index_files(tmp_path: Path) -> None:
    directory = _two_shards(tmp_path / "model")
    index = directory / files.INDEX_NAME
    index.write_text("{not json")
    _refusal(directory, "corrupt", "is not valid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    _refusal(directory, "bad-index", 'no "weight_map"')
    index.write_text(json.dumps({"weight_map": {"a": 3}}))
    _refusal(directory, "bad-index", "entry 'a' maps to 3")
    index.write_text('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}')
    _refusal(directory, "corrupt", "key 'a' appears twice")


def test_checkpoint_error_is_a_value_error_and_pickles(tmp_path: Path) -> None:
    error = _refusal(tmp_path / "nowhere", "missing")
    assert issubclass(CheckpointError, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path, copy.reason, copy.key) == (
        str(error),
        error.path,
        error.reason,
        error.key,
    )


# -- writing ---------------------------------------------------------------------------------


def test_save_tensors_writes_a_file_with_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    shared = torch.arange(6.0)
    save_tensors(path, {"a": shared, "b": shared, "view": shared[2:4]}, {"k": "v"})
    tensors, metadata = read_tensors(path)
    assert metadata == {"k": "v"}
    assert torch.equal(tensors["a"], shared) and torch.equal(tensors["view"], shared[2:4])
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert list(tmp_path.iterdir()) == [path]


def test_save_tensors_checks_types(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        save_tensors(tmp_path / "x.safetensors", {"a": [1.0]})  # type: ignore[dict-item, unused-ignore]
    with pytest.raises(TypeError, match="metadata maps str to str"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(1)}, {"n": 1})  # type: ignore[dict-item, unused-ignore]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failure", ["write", "fsync", "interrupt"])
def test_save_tensors_is_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool, failure: str
) -> None:
    path = tmp_path / "out.safetensors"
    if existing:
        save_tensors(path, {"old": torch.ones(1)})
    before = path.read_bytes() if existing else None

    def partial_write(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt if failure == "interrupt" else OSError("disk full")

    def failing_fsync(descriptor: int) -> None:
        raise OSError("I/O error")

    if failure == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    else:
        monkeypatch.setattr(atomic, "save_file", partial_write)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_tensors(path, {"new": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == ([path] if existing else [])
    if existing:
        assert path.read_bytes() == before


def test_save_tensors_fsyncs_the_file_and_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/fd")
    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    save_tensors(tmp_path / "out.safetensors", {"a": torch.ones(2)})
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(".out.safetensors.") and synced[0].endswith(".tmp")
    assert Path(synced[1]) == tmp_path
