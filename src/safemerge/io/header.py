"""The safetensors header: parsed and checked before any tensor is read.

A header names every tensor with its dtype, shape and byte range; :func:`read_header`
checks all of them against the file (names unique, shapes and dtypes known, every byte
range inside the file and the ranges not overlapping), so a truncated or lying file fails
when it is opened, not halfway through a merge.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge.errors import CheckpointError

# safetensors' dtype names (the header's "dtype" field) and the torch dtypes they hold.
DTYPES: dict[str, torch.dtype] = {
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


DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


# safetensors refuses headers above 100 MB; a larger length means this is no safetensors file.
_MAX_HEADER_BYTES = 100_000_000


CORRUPT_ADVICE = "re-download or re-copy it, or re-save it with safetensors.torch.save_file"


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    # Where each tensor's data starts in its file, and the file's size, when parsed.
    offsets: dict[str, int]
    file_bytes: int


def read_header(file: Path) -> Header:
    """Parse and check a safetensors header; no tensor data is read."""
    refuse_pickle(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise truncated(file, f"it has {size} bytes, less than the 8-byte header length")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > _MAX_HEADER_BYTES:
                raise corrupt(
                    file,
                    f"its header length field reads {header_bytes} bytes: not a safetensors file",
                )
            if 8 + header_bytes > size:
                raise truncated(
                    file, f"its header needs {header_bytes} bytes but only {size - 8} follow"
                )
            raw = stream.read(header_bytes)
    except OSError as error:
        raise unreadable(file, error) from error
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except ValueError as error:
        raise corrupt(file, f"its header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise corrupt(file, "its header is not a JSON object")
    tensors, begins = _tensor_infos(file, header, data_bytes=size - 8 - header_bytes)
    return Header(
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
            raise corrupt(
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
            raise corrupt(file, f"tensor {name!r} {gap} {where} (data offsets)", key=name)
        position, previous = end, name
    if position > data_bytes:
        raise truncated(
            file,
            f"its header places {position} bytes of tensor data but only {data_bytes} follow "
            f"the header",
        )
    if position < data_bytes:
        raise corrupt(
            file, f"{data_bytes - position} bytes follow the last tensor that no header entry names"
        )
    return tensors, {name: begin for begin, _, name in spans}


def _entry_fields(
    file: Path, name: str, entry: Any
) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        raise corrupt(file, f"header entry {name!r} is not an object", key=name)
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise CheckpointError(
            f"tensor {name!r} in {file} has dtype {entry.get('dtype')!r}, which safemerge cannot "
            f"read (known: {', '.join(DTYPES)}); convert the tensor to a supported dtype",
            path=file,
            reason="unsupported-dtype",
            key=name,
        )
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(size) for size in shape)):
        raise corrupt(file, f"tensor {name!r} has shape {shape!r}", key=name)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(offset) for offset in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise corrupt(file, f"tensor {name!r} has data offsets {offsets!r}", key=name)
    return dtype, tuple(shape), offsets[0], offsets[1]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_metadata(file: Path, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise corrupt(file, "its __metadata__ is not a mapping of strings to strings")
    return dict(metadata)


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def truncated(file: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{file} is truncated: {why}. An interrupted download or copy leaves exactly this; "
        f"{CORRUPT_ADVICE}",
        path=file,
        reason="truncated",
    )


def corrupt(file: Path, why: str, *, key: str | None = None) -> CheckpointError:
    return CheckpointError(
        f"{file} is corrupt or not a safetensors file: {why}; {CORRUPT_ADVICE}",
        path=file,
        reason="corrupt",
        key=key,
    )


def unreadable(file: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read {file}: {error}. The file is truncated, corrupt or unreadable; "
        f"{CORRUPT_ADVICE}",
        path=file,
        reason="corrupt",
    )


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


CONVERT_ADVICE = (
    "safemerge never unpickles files (loading a pickle can run arbitrary code). Convert it "
    "once, in an environment you trust: `sd = torch.load(path, weights_only=True)` then "
    "`safetensors.torch.save_file(sd, 'model.safetensors')` (or the `convert` scripts of "
    "safetensors / transformers), and pass the .safetensors file instead"
)


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


def refuse_pickle(path: Path) -> None:
    """Raise a :class:`CheckpointError` if ``path`` is, by name or content, a pickled checkpoint."""
    if path.suffix.lower() in PICKLED_SUFFIXES:
        raise _pickled(path, f"its name ends in {path.suffix}")
    if path.is_file():
        with path.open("rb") as stream:
            kind = _pickle_kind(stream.read(9))
        if kind is not None:
            raise _pickled(path, kind)


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
        f"{path} is a pickled PyTorch checkpoint ({why}). {CONVERT_ADVICE}",
        path=path,
        reason="pickled",
    )
