"""One safetensors file written as its tensors arrive, never all in memory."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from safemerge.io.atomic import WRITE_CHUNK, checked_metadata, start_writeback
from safemerge.io.header import DTYPE_NAMES


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor's data in a safetensors file."""
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * dtype.itemsize


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
            if dtype not in DTYPE_NAMES:
                raise ValueError(
                    f"tensor {name!r} has dtype {dtype}, which safetensors cannot store "
                    f"(known: {', '.join(str(d) for d in DTYPE_NAMES)})"
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
        checked = checked_metadata(metadata)
        if checked:
            header["__metadata__"] = checked
        for name, (shape, dtype) in planned.items():
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
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
            start_writeback(self._descriptor, self._data_start + begin, end - begin)
        self._written.add(name)

    def close(self) -> None:
        """Check every tensor was written, flush the file to disk (fsync) and close it.

        The disk has been writing each tensor since it was written (see
        :func:`safemerge.io.atomic.start_writeback`); the fsync waits for the rest.

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
            done += os.pwrite(self._descriptor, view[done : done + WRITE_CHUNK], offset + done)

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
