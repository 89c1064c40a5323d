"""Model and adapter checkpoints read lazily and checked on opening; pickles refused.

A checkpoint is one ``.safetensors`` file, or a directory with ``model.safetensors`` or
shards listed by ``model.safetensors.index.json``. Headers are read and checked when the
checkpoint is opened (:mod:`safemerge.io.header`), so a truncated or lying file fails at
once; tensor data is read one tensor at a time, through a memory map, and copied out so
that memory grows with the largest tensor, not the model. Writing is in
:mod:`safemerge.io.atomic` and :mod:`safemerge.io.shard_writer`; this package is the only
importer of ``safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from safemerge.errors import CheckpointError
from safemerge.io.header import (
    CONVERT_ADVICE,
    CORRUPT_ADVICE,
    PICKLED_SUFFIXES,
    Header,
    TensorInfo,
    no_duplicate_keys,
    read_header,
    unreadable,
)

INDEX_NAME = "model.safetensors.index.json"


SINGLE_NAME = "model.safetensors"


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
                f"or corrupt (or changed since it was opened); {CORRUPT_ADVICE}",
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
            raise unreadable(info.file, error) from error
        if size != expected or done != info.nbytes:
            raise CheckpointError(
                f"cannot read tensor {info.name!r} from {info.file}: the file is now {size} "
                f"bytes, not the {expected} it had when opened. The file is truncated, corrupt "
                f"or unreadable (or changed since it was opened); {CORRUPT_ADVICE}",
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
                raise unreadable(file, error) from error
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
        return _single(path, read_header(single))
    if path.name.endswith(".safetensors.index.json"):
        return _open_sharded(path.parent, path)
    return _single(path, read_header(path))


def _single(path: Path, header: Header) -> Checkpoint:
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
        # Straight from the file: through a memory map, each page faulted in one by one cost
        # 0.4-0.6 s for a 50 MB adapter (TinyLlama's 154 projections), 0.1 s this way.
        tensors = {name: checkpoint.read(name, mapped=False) for name in checkpoint}
        return tensors, checkpoint.metadata


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
        raise unreadable(path, error) from error
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except ValueError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); fix or regenerate the file",
            path=path,
            reason="corrupt",
        ) from error


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
            f"({', '.join(pickles)}). {CONVERT_ADVICE}",
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
    headers: dict[Path, Header] = {}
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
        headers[shard] = read_header(shard)
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


def _refuse_duplicates(headers: Mapping[Path, Header]) -> None:
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
