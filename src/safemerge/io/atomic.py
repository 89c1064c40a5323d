"""Files written atomically: all of a file under its name, or nothing new there.

Every write goes to a temporary file in the target's directory, is fsynced, and replaces
the target in one rename; the directory is fsynced after. This module and
:mod:`safemerge.io.shard_writer` are the only writers of the safetensors format.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
    header_metadata = checked_metadata(metadata)
    _write_atomically(Path(path), lambda temp: save_file(prepared, str(temp), header_metadata))


def save_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as indented JSON, atomically, like :func:`save_tensors`; key order kept."""
    text = json.dumps(value, indent=2) + "\n"

    def write(temp: Path) -> None:
        temp.write_text(text, encoding="utf-8")

    _write_atomically(Path(path), write)


def save_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write ``payload`` atomically, like :func:`save_tensors`."""

    def write(temp: Path) -> None:
        temp.write_bytes(payload)

    _write_atomically(Path(path), write)


def file_digest(paths: Iterable[str | os.PathLike[str]]) -> str:
    """SHA-256 (hex) of the files' bytes, one after another."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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


def checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
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
    fsync_directory(directory)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a directory's entries (files created, renamed, removed in it) durable."""
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


#: Bytes handed to one ``os.pwrite`` call (Linux writes at most about 2 GiB per call).
WRITE_CHUNK = 64 * 1024 * 1024


def start_writeback(descriptor: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a file's byte range to disk now, without waiting.

    A model's shard is fsynced only once complete; left to itself, the kernel writes
    most of it back only then (or once dirty pages pass its threshold), so the final
    fsync waited for the disk to write gigabytes. Started as each tensor is written,
    the disk works while the next ones are computed, and the fsync (which still makes
    the file durable: this call promises nothing) finds little left. Linux's
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere, or if it fails, nothing.
    """
    call = _sync_file_range()
    if call is not None and length > 0:
        call(descriptor, offset, length, _SYNC_FILE_RANGE_WRITE)  # an error costs speed only


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def copy_file(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy a file's bytes (following links) to a new file ``target``, fsynced.

    Raises:
        FileExistsError: ``target`` exists.
    """
    with Path(source).open("rb") as reader, Path(target).open("xb") as writer:
        shutil.copyfileobj(reader, writer, WRITE_CHUNK)
        writer.flush()
        os.fsync(writer.fileno())
