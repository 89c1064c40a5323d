"""Model and adapter files: safetensors read lazily, written atomically; pickles refused.

This is the only module that imports ``safetensors``, and the only one that writes the
format (:class:`ShardWriter` streams one file tensor by tensor). A checkpoint is one
``.safetensors`` file, or a directory with ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Headers are read and checked when the checkpoint is
opened (names, shapes, dtypes, and that every tensor's bytes lie inside its file), so a
truncated or lying file fails at once; tensor data is read one tensor at a time, through
a memory map, and copied out so that memory grows with the largest tensor, not the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safemerge.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# safetensors' dtype names (the header's "dtype" field) and the torch dtypes they hold.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}
# safetensors refuses headers above 100 MB; a larger length means this is no safetensors file.
_MAX_HEADER_BYTES = 100_000_000

_CONVERT_ADVICE = (
    "safemerge never unpickles files (loading a pickle can run arbitrary code). Convert it "
    "once, in an environment you trust: `sd = torch.load(path, weights_only=True)` then "
    "`safetensors.torch.save_file(sd, 'model.safetensors')` (or the `convert` scripts of "
    "safetensors / transformers), and pass the .safetensors file instead"
)
_CORRUPT_ADVICE = "re-download or re-copy it, or re-save it with safetensors.torch.save_file"


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint's header says about one tensor, known without reading its data.

    Attributes:
        name: the tensor's name in the checkpoint.
        shape: its shape.
        dtype: its torch dtype.
        file: the ``.safetensors`` file holding it.
        nbytes: the size of its data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int


@dataclass(frozen=True)
class _Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    # Where each tensor's data starts in its file, and the file's size, when parsed.
    offsets: dict[str, int]
    file_bytes: int


class Checkpoint:
    """A model's named tensors on disk, opened lazily; use :func:`open_checkpoint`.

    Iterating gives the names in header (or index) order; ``name in checkpoint`` and
    ``len(checkpoint)`` work as for a mapping. Use as a context manager, or call
    :meth:`close`, to release the memory maps.
    """

    def __init__(
        self,
        path: Path,
        tensors: Mapping[str, TensorInfo],
        metadata: Mapping[str, str],
        *,
        offsets: Mapping[str, int] | None = None,
        file_bytes: Mapping[Path, int] | None = None,
    ):
        self._path = path
        self._tensors = dict(tensors)
        self._offsets = dict(offsets or {})
        self._file_bytes = dict(file_bytes or {})
        self._names = tuple(self._tensors)
        self._metadata = dict(metadata)
        self._handles: dict[Path, Any] = {}
        self._closed = False

    @property
    def path(self) -> Path:
        """The file or directory this checkpoint was opened from."""
        return self._path

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` (all shards' merged, in shard order, for a sharded model)."""
        return dict(self._metadata)

    @property
    def total_bytes(self) -> int:
        """The size of all tensor data, in bytes."""
        return sum(info.nbytes for info in self._tensors.values())

    @property
    def files(self) -> tuple[Path, ...]:
        """The ``.safetensors`` files holding the tensors, in order of first use."""
        return tuple(dict.fromkeys(info.file for info in self._tensors.values()))

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype, file and size of tensor ``name``, from the header alone.

        Raises:
            KeyError: no tensor of that name.
        """
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in checkpoint {self._path}") from None

    def read(self, name: str, *, mapped: bool = True) -> torch.Tensor:
        """Read tensor ``name`` into memory (a CPU copy of its own, not a view of the file).

        Args:
            name: the tensor.
            mapped: read through a memory map of the file, kept open for further reads.
                With ``mapped=False`` the bytes go straight from the file into the new
                tensor: it is the only copy in memory, and no page of the file stays
                counted in this process's resident memory (a map's pages do, as long as
                the map lives): for streaming a whole model through in bounded memory.

        Raises:
            KeyError: no tensor of that name.
            CheckpointError: the file can no longer be read as its header said.
            ValueError: the checkpoint is closed.
        """
        info = self.info(name)
        if self._closed:
            raise ValueError(f"checkpoint {self._path} is closed; open it again to read {name!r}")
        if not mapped and name in self._offsets:
            return self._read_unmapped(info, self._offsets[name])
        handle = self._handle(info.file)
        try:
            in_map: torch.Tensor = handle.get_tensor(name)
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(
                f"cannot read tensor {name!r} from {info.file}: {error}. The file is truncated "
                f"or corrupt (or changed since it was opened); {_CORRUPT_ADVICE}",
                path=info.file,
                reason="corrupt",
                key=name,
            ) from error
        # get_tensor returns a view of the memory map; the copy lets the map close and
        # keeps later changes to the file out of the tensor.
        tensor = in_map.clone()
        del in_map
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise CheckpointError(
                f"tensor {name!r} in {info.file} is {tensor.dtype} {tuple(tensor.shape)} but its "
                f"header said {info.dtype} {info.shape} when opened: the file changed since; "
                f"open the checkpoint again",
                path=info.file,
                reason="corrupt",
                key=name,
            )
        return tensor

    def _read_unmapped(self, info: TensorInfo, offset: int) -> torch.Tensor:
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy().data)
        done = 0
        try:
            with info.file.open("rb", buffering=0) as stream:
                size = os.fstat(stream.fileno()).st_size
                expected = self._file_bytes.get(info.file, size)
                if size == expected:
                    stream.seek(offset)
                    while done < info.nbytes:
                        count = stream.readinto(view[done:])
                        if not count:
                            break
                        done += count
        except OSError as error:
            raise _unreadable(info.file, error) from error
        if size != expected or done != info.nbytes:
            raise CheckpointError(
                f"cannot read tensor {info.name!r} from {info.file}: the file is now {size} "
                f"bytes, not the {expected} it had when opened. The file is truncated, corrupt "
                f"or unreadable (or changed since it was opened); {_CORRUPT_ADVICE}",
                path=info.file,
                reason="corrupt",
                key=info.name,
            )
        tensor: torch.Tensor = buffer.view(info.dtype).reshape(info.shape)
        return tensor

    def close(self) -> None:
        """Release the memory maps; :meth:`read` raises afterwards."""
        self._handles.clear()
        self._closed = True

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as error:  # SafetensorError or OSError
                raise _unreadable(file, error) from error
            self._handles[file] = handle
        return handle

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self._path)!r}, {len(self)} tensors, {self.total_bytes} bytes"
            f"{', closed' if self._closed else ''})"
        )


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a safetensors checkpoint lazily: headers now, tensor data on :meth:`Checkpoint.read`.

    Args:
        path: a ``.safetensors`` file; a ``*.safetensors.index.json`` listing shards; or a
            directory holding ``model.safetensors``, or shards listed by
            ``model.safetensors.index.json`` (or one other ``*.safetensors`` file or
            ``*.safetensors.index.json``).

    Returns:
        The :class:`Checkpoint`, with every header checked against its file's size.

    Raises:
        CheckpointError: missing path; no safetensors file; a pickled checkpoint; a
            truncated or corrupt file; an index entry outside the directory, naming a
            missing shard or a tensor its shard lacks; a tensor in two shards.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"no such file or directory: {path}; pass a .safetensors file, or a directory "
            f"holding {SINGLE_NAME} or {INDEX_NAME} and its shards",
            path=path,
            reason="missing",
        )
    if path.is_dir():
        index, single = _locate(path)
        if index is not None:
            return _open_sharded(path, index)
        assert single is not None
        return _single(path, _read_header(single))
    if path.name.endswith(".safetensors.index.json"):
        return _open_sharded(path.parent, path)
    return _single(path, _read_header(path))


def _single(path: Path, header: _Header) -> Checkpoint:
    file = next(iter(header.tensors.values())).file if header.tensors else path
    return Checkpoint(
        path,
        header.tensors,
        header.metadata,
        offsets=header.offsets,
        file_bytes={file: header.file_bytes},
    )


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a (small) safetensors file, such as an adapter.

    Raises:
        CheckpointError: as :func:`open_checkpoint`.
    """
    with open_checkpoint(path) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint}, checkpoint.metadata


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one safetensors file atomically: all of it under ``path``, or nothing new there.

    The data goes to a temporary file in the same directory, is fsynced, and replaces
    ``path`` in one rename; the directory is fsynced after. On any exception the
    temporary file is removed and ``path`` is as it was.

    Raises:
        TypeError: a name, tensor or metadata value of the wrong type.
    """
    prepared = _prepared_tensors(tensors)
    header_metadata = _checked_metadata(metadata)
    _write_atomically(Path(path), lambda temp: save_file(prepared, str(temp), header_metadata))


def save_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as indented JSON, atomically, like :func:`save_tensors`; key order kept."""
    text = json.dumps(value, indent=2) + "\n"

    def write(temp: Path) -> None:
        temp.write_text(text, encoding="utf-8")

    _write_atomically(Path(path), write)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file (an index, an adapter config).

    Raises:
        CheckpointError: the file is missing, unreadable or not valid JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"no such file: {path}", path=path, reason="missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise _unreadable(path, error) from error
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); fix or regenerate the file",
            path=path,
            reason="corrupt",
        ) from error


def file_digest(paths: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 (hex) of the files' bytes, one after another."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def refuse_pickle(path: Path) -> None:
    """Raise a :class:`CheckpointError` if ``path`` is, by name or content, a pickled checkpoint."""
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise _pickled(path, f"its name ends in {path.suffix}")
    if path.is_file():
        with path.open("rb") as stream:
            kind = _pickle_kind(stream.read(9))
        if kind is not None:
            raise _pickled(path, kind)


# -- locating files ------------------------------------------------------------------------


def _locate(directory: Path) -> tuple[Path | None, Path | None]:
    """``(index, single file)`` for a model directory; exactly one of them is set."""
    index = directory / INDEX_NAME
    if index.is_file():
        return index, None
    single = directory / SINGLE_NAME
    if single.is_file():
        return None, single
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0], None
    files = sorted(directory.glob("*.safetensors"))
    if not indexes and len(files) == 1:
        return None, files[0]
    if indexes or files:
        found = ", ".join(p.name for p in (indexes or files))
        raise CheckpointError(
            f"directory {directory} holds several checkpoints and no {SINGLE_NAME} or "
            f"{INDEX_NAME} to say which is the model: {found}; pass the file (or index) "
            f"you mean",
            path=directory,
            reason="ambiguous",
        )
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLED_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"directory {directory} has no .safetensors file, only pickled checkpoints "
            f"({', '.join(pickles)}). {_CONVERT_ADVICE}",
            path=directory,
            reason="pickled",
        )
    raise CheckpointError(
        f"directory {directory} has no .safetensors file ({SINGLE_NAME}, or shards listed by "
        f"{INDEX_NAME}); pass the directory that holds the model's weights",
        path=directory,
        reason="no-safetensors",
    )


def _open_sharded(directory: Path, index_file: Path) -> Checkpoint:
    weight_map = _read_weight_map(index_file)
    shard_of: dict[str, Path] = {}
    for name, relative in weight_map.items():
        shard_of[name] = _shard_path(directory, index_file, name, relative)
    headers: dict[Path, _Header] = {}
    for name, shard in shard_of.items():
        if shard in headers:
            continue
        if not shard.is_file():
            raise CheckpointError(
                f"index {index_file} lists shard {weight_map[name]!r} (for tensor {name!r}) but "
                f"there is no such file in {directory}; download the missing shard, or "
                f"regenerate the index",
                path=shard,
                reason="missing-shard",
                key=name,
            )
        headers[shard] = _read_header(shard)
    _refuse_duplicates(headers)
    for name, shard in shard_of.items():
        if name not in headers[shard].tensors:
            raise CheckpointError(
                f"index {index_file} says tensor {name!r} is in shard {shard.name!r}, but that "
                f"shard has no such tensor; the index and shards disagree: re-download both, "
                f"or regenerate the index",
                path=shard,
                reason="missing-tensor",
                key=name,
            )
    for shard, header in headers.items():
        for name in header.tensors:
            if name not in shard_of:
                raise CheckpointError(
                    f"shard {shard} holds tensor {name!r}, which index {index_file} does not "
                    f"list; the index and shards disagree: re-download both, or regenerate "
                    f"the index",
                    path=shard,
                    reason="unlisted-tensor",
                    key=name,
                )
    metadata: dict[str, str] = {}
    for header in headers.values():
        for key, value in header.metadata.items():
            metadata.setdefault(key, value)
    tensors = {name: headers[shard].tensors[name] for name, shard in shard_of.items()}
    return Checkpoint(
        directory,
        tensors,
        metadata,
        offsets={name: headers[shard].offsets[name] for name, shard in shard_of.items()},
        file_bytes={shard: header.file_bytes for shard, header in headers.items()},
    )


def _read_weight_map(index_file: Path) -> dict[str, str]:
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f'index {index_file} has no "weight_map" naming each tensor\'s shard; regenerate '
            f"it (transformers' save_pretrained writes one)",
            path=index_file,
            reason="bad-index",
        )
    for name, relative in weight_map.items():
        if not isinstance(relative, str):
            raise CheckpointError(
                f"index {index_file}: entry {name!r} maps to {relative!r}, not a file name; "
                f"fix or regenerate the index",
                path=index_file,
                reason="bad-index",
                key=name,
            )
    return weight_map


def _shard_path(directory: Path, index_file: Path, name: str, relative: str) -> Path:
    """The shard file for an index entry, refused unless it lies inside the model directory."""
    problem = None
    parts = PureWindowsPath(relative).parts  # splits on '/' and '\\' alike
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).anchor:
        problem = "it is an absolute path"
    elif ".." in parts:
        problem = "it climbs out of the directory with '..'"
    else:
        resolved = (directory / relative).resolve()
        if not any(resolved.is_relative_to(root) for root in _allowed_roots(directory)):
            problem = f"it resolves (through a symbolic link) to {resolved}, outside the directory"
    if problem is not None:
        raise CheckpointError(
            f"index {index_file} names shard {relative!r} for tensor {name!r}, but {problem}; "
            f"refusing to read it. Every shard must be a file inside the model directory "
            f"{directory}: fix the index entry (or the link)",
            path=index_file,
            reason="unsafe-path",
            key=name,
        )
    return directory / relative


def _allowed_roots(directory: Path) -> list[Path]:
    roots = [directory.resolve()]
    # The Hugging Face hub cache keeps files in <repo>/blobs and links them from
    # <repo>/snapshots/<revision>/...: links into that repository's blobs are its own files.
    for folder in (directory.absolute(), *directory.absolute().parents):
        if folder.parent.name == "snapshots":
            roots.append((folder.parent.parent / "blobs").resolve())
            break
    return roots


def _refuse_duplicates(headers: Mapping[Path, _Header]) -> None:
    seen: dict[str, Path] = {}
    for shard, header in headers.items():
        for name in header.tensors:
            first = seen.setdefault(name, shard)
            if first != shard:
                raise CheckpointError(
                    f"tensor {name!r} is stored in two shards, {first.name!r} and "
                    f"{shard.name!r}; which one is the model's is unknown. Remove the stale "
                    f"shard, or re-download the checkpoint",
                    path=shard,
                    reason="duplicate",
                    key=name,
                )


# -- headers -------------------------------------------------------------------------------


def _read_header(file: Path) -> _Header:
    """Parse and check a safetensors header; no tensor data is read."""
    refuse_pickle(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise _truncated(file, f"it has {size} bytes, less than the 8-byte header length")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > _MAX_HEADER_BYTES:
                raise _corrupt(
                    file,
                    f"its header length field reads {header_bytes} bytes: not a safetensors file",
                )
            if 8 + header_bytes > size:
                raise _truncated(
                    file, f"its header needs {header_bytes} bytes but only {size - 8} follow"
                )
            raw = stream.read(header_bytes)
    except OSError as error:
        raise _unreadable(file, error) from error
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as error:
        raise _corrupt(file, f"its header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    tensors, begins = _tensor_infos(file, header, data_bytes=size - 8 - header_bytes)
    return _Header(
        tensors,
        _header_metadata(file, header.get("__metadata__")),
        offsets={name: 8 + header_bytes + begin for name, begin in begins.items()},
        file_bytes=size,
    )


def _tensor_infos(
    file: Path, header: dict[str, Any], *, data_bytes: int
) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """Each tensor's info, and where its data begins in the data section."""
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry_fields(file, name, entry)
        numel = 1
        for size in shape:
            numel *= size
        expected = numel * dtype.itemsize
        if end - begin != expected:
            raise _corrupt(
                file,
                f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its data "
                f"offsets [{begin}, {end}) span {end - begin}",
                key=name,
            )
        tensors[name] = TensorInfo(name, shape, dtype, file, expected)
        spans.append((begin, end, name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            where = f"after tensor {previous!r}" if previous else "at the start of the data"
            gap = "overlaps the tensor before" if begin < position else "leaves a gap"
            raise _corrupt(file, f"tensor {name!r} {gap} {where} (data offsets)", key=name)
        position, previous = end, name
    if position > data_bytes:
        raise _truncated(
            file,
            f"its header places {position} bytes of tensor data but only {data_bytes} follow "
            f"the header",
        )
    if position < data_bytes:
        raise _corrupt(
            file, f"{data_bytes - position} bytes follow the last tensor that no header entry names"
        )
    return tensors, {name: begin for begin, _, name in spans}


def _entry_fields(
    file: Path, name: str, entry: Any
) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise _corrupt(file, f"header entry {name!r} is not an object", key=name)
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CheckpointError(
            f"tensor {name!r} in {file} has dtype {entry.get('dtype')!r}, which safemerge cannot "
            f"read (known: {', '.join(_DTYPES)}); convert the tensor to a supported dtype",
            path=file,
            reason="unsupported-dtype",
            key=name,
        )
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(size) for size in shape)):
        raise _corrupt(file, f"tensor {name!r} has shape {shape!r}", key=name)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(offset) for offset in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise _corrupt(file, f"tensor {name!r} has data offsets {offsets!r}", key=name)
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_metadata(file: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise _corrupt(file, "its __metadata__ is not a mapping of strings to strings")
    return dict(metadata)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _pickle_kind(prefix: bytes) -> str | None:
    """Why the first 9 bytes show a pickle or torch.save zip, or None."""
    if prefix[8:9] == b"{":  # a safetensors header starts there, whatever its length reads
        return None
    if prefix.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "it is a zip archive, as torch.save writes"
    if len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return "it starts with a pickle protocol marker"
    return None


def _pickled(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickled PyTorch checkpoint ({why}). {_CONVERT_ADVICE}",
        path=path,
        reason="pickled",
    )


def _truncated(file: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{file} is truncated: {why}. An interrupted download or copy leaves exactly this; "
        f"{_CORRUPT_ADVICE}",
        path=file,
        reason="truncated",
    )


def _corrupt(file: Path, why: str, *, key: str | None = None) -> CheckpointError:
    return CheckpointError(
        f"{file} is corrupt or not a safetensors file: {why}; {_CORRUPT_ADVICE}",
        path=file,
        reason="corrupt",
        key=key,
    )


def _unreadable(file: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read {file}: {error}. The file is truncated, corrupt or unreadable; "
        f"{_CORRUPT_ADVICE}",
        path=file,
        reason="corrupt",
    )


# -- writing -------------------------------------------------------------------------------


def _prepared_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses shared ones)."""
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str; got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} must be a torch.Tensor; got {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages and tensor.numel() > 0:
            tensor = tensor.clone()
            pointer = tensor.untyped_storage().data_ptr()
        storages.add(pointer)
        prepared[name] = tensor
    return prepared


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata maps str to str; got {key!r}: {value!r}")
    return dict(metadata)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    directory = path.parent
    temp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # O_EXCL reserves a fresh name; mode 0o666 lets the umask set the usual permissions.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = temp.stat().st_mode & 0o777
    try:
        write(temp)
        # safetensors (0.8) writes its files with mode 0o600 whatever the umask: restore it.
        os.chmod(temp, mode)
        with temp.open("rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a directory's entries (files created, renamed, removed in it) durable."""
    _fsync_directory(Path(directory))


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- streaming writes ----------------------------------------------------------------------

#: Bytes handed to one ``os.pwrite`` call (Linux writes at most about 2 GiB per call).
_WRITE_CHUNK = 64 * 1024 * 1024


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor's data in a safetensors file."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * dtype.itemsize


def copy_file(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy a file's bytes (following links) to a new file ``target``, fsynced.

    Raises:
        FileExistsError: ``target`` exists.
    """
    with Path(source).open("rb") as reader, Path(target).open("xb") as writer:
        shutil.copyfileobj(reader, writer, _WRITE_CHUNK)
        writer.flush()
        os.fsync(writer.fileno())


class ShardWriter:
    """One safetensors file written as its tensors arrive, in any order, never all in memory.

    The shapes and dtypes are known up front, so the header (names, dtypes, shapes, data
    offsets, metadata) is written first and each tensor's bytes go straight to their place.
    In the data, tensors are laid out by decreasing element size (as safetensors does), so
    every tensor starts aligned to its element size. The file is created new (never
    replaced) and is complete only after :meth:`close`; use :meth:`abort` (or the context
    manager, on an exception) to give up, and remove the file yourself.

    Args:
        path: the file to create; it must not exist.
        entries: ``(name, shape, dtype)`` of every tensor the file will hold.
        metadata: the header's ``__metadata__`` (strings to strings).

    Raises:
        ValueError: a name given twice, or a dtype safetensors cannot store.
        TypeError: metadata that is not strings to strings.
        FileExistsError: ``path`` exists.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Iterable[tuple[str, Iterable[int], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":  # safetensors is little-endian; tensors are written raw
            raise NotImplementedError("writing safetensors needs a little-endian machine")
        self.path = Path(path)
        planned: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape, dtype in entries:
            if name in planned:
                raise ValueError(f"tensor {name!r} is listed twice for {self.path}")
            if dtype not in _DTYPE_NAMES:
                raise ValueError(
                    f"tensor {name!r} has dtype {dtype}, which safetensors cannot store "
                    f"(known: {', '.join(str(d) for d in _DTYPE_NAMES)})"
                )
            planned[name] = (tuple(int(size) for size in shape), dtype)
        self._planned = planned
        # Stable sort by element size, largest first: every offset is then a multiple of
        # each later tensor's element size, and the data starts 8-aligned.
        layout = sorted(planned, key=lambda name: -planned[name][1].itemsize)
        self._spans: dict[str, tuple[int, int]] = {}
        position = 0
        for name in layout:
            shape, dtype = planned[name]
            end = position + tensor_nbytes(shape, dtype)
            self._spans[name] = (position, end)
            position = end
        self.data_bytes = position
        header: dict[str, Any] = {}
        checked = _checked_metadata(metadata)
        if checked:
            header["__metadata__"] = checked
        for name, (shape, dtype) in planned.items():
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": list(self._spans[name]),
            }
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # pad so the data starts 8-aligned
        self._data_start = 8 + len(text)
        self._written: set[str] = set()
        self._descriptor: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
        )
        try:
            self._pwrite(struct.pack("<Q", len(text)) + text, 0)
        except BaseException:
            self.abort()
            raise

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors this file holds, in the order given."""
        return tuple(self._planned)

    @property
    def missing(self) -> tuple[str, ...]:
        """The tensors not written yet."""
        return tuple(name for name in self._planned if name not in self._written)

    @property
    def file_bytes(self) -> int:
        """The size the complete file will have."""
        return self._data_start + self.data_bytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor's bytes (copied to the CPU first if needed).

        Raises:
            KeyError: ``name`` is not planned for this file.
            ValueError: it was written already, or its shape or dtype differ from the plan;
                or the file is closed.
        """
        if self._descriptor is None:
            raise ValueError(f"{self.path} is closed; cannot write tensor {name!r}")
        if name not in self._planned:
            raise KeyError(f"tensor {name!r} is not planned for {self.path}")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was already written to {self.path}")
        shape, dtype = self._planned[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but {self.path}'s "
                f"header says {dtype} {shape}"
            )
        begin, end = self._spans[name]
        if end > begin:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._pwrite(memoryview(data.numpy().data), self._data_start + begin)
        self._written.add(name)

    def close(self) -> None:
        """Check every tensor was written, flush the file to disk (fsync) and close it.

        Raises:
            ValueError: tensors were not written (the file stays open; :meth:`abort` it).
        """
        if self._descriptor is None:
            return
        missing = self.missing
        if missing:
            shown = ", ".join(repr(name) for name in missing[:5])
            raise ValueError(
                f"{self.path} is incomplete: {len(missing)} tensor(s) not written ({shown})"
            )
        descriptor, self._descriptor = self._descriptor, None
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def abort(self) -> None:
        """Close the file without checks (it stays, incomplete, for the caller to remove)."""
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        assert self._descriptor is not None
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._descriptor, view[done : done + _WRITE_CHUNK], offset + done)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
