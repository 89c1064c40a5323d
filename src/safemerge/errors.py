"""The errors safemerge raises; each carries its facts as attributes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class SafemergeError(Exception):
    """Base class of every error safemerge raises on purpose."""


class AdapterConfigError(SafemergeError, ValueError):
    """An adapter, its configuration or its shapes do not fit the layer."""


class UnsupportedLayerError(SafemergeError, TypeError):
    """The layer kind (or one of its settings) cannot be fused safely."""


class RestoreError(SafemergeError, ValueError):
    """An unfuse cannot restore the layer (wrong record, or no correction kept)."""


class NonFiniteMergeError(SafemergeError, ValueError):
    """The merged tensor would not be finite in the layer's dtype; nothing was changed.

    Attributes:
        layer: name of the layer (or its class name when no name was given).
        tensor: which tensor of the layer, ``"weight"`` or ``"bias"``.
        dtype: the dtype the merged values would have been cast to.
        shape: shape of that tensor.
        numel: number of elements in it.
        nan_count: elements whose float32 merge is NaN.
        posinf_count: elements whose float32 merge is +Inf.
        neginf_count: elements whose float32 merge is -Inf.
        overflow_count: elements finite in float32 that do not fit ``dtype`` (they would
            become +-Inf in the cast, or saturate for float8_e4m3fn, which has no Inf).
        first_index: index (into the tensor) of the first bad element, row-major.
        dtype_max: the largest finite value of ``dtype``.
    """

    def __init__(
        self,
        *,
        layer: str,
        tensor: str,
        dtype: torch.dtype,
        shape: Sequence[int],
        nan_count: int,
        posinf_count: int,
        neginf_count: int,
        overflow_count: int,
        first_index: tuple[int, ...],
    ) -> None:
        self.layer = layer
        self.tensor = tensor
        self.dtype = dtype
        self.shape = tuple(shape)
        self.numel = 1
        for size in self.shape:
            self.numel *= size
        self.nan_count = nan_count
        self.posinf_count = posinf_count
        self.neginf_count = neginf_count
        self.overflow_count = overflow_count
        self.first_index = first_index
        self.dtype_max = float(torch.finfo(dtype).max)
        super().__init__(self._message())

    @property
    def bad_count(self) -> int:
        """All refused elements: NaN, +Inf, -Inf and overflow-on-cast together."""
        return self.nan_count + self.posinf_count + self.neginf_count + self.overflow_count

    def _message(self) -> str:
        dtype_name = str(self.dtype).removeprefix("torch.")
        percent = 100.0 * self.bad_count / max(self.numel, 1)
        return (
            f"refusing to fuse into layer {self.layer!r}: the merged {self.tensor} "
            f"({dtype_name}, shape {self.shape}) would have {self.bad_count} non-finite of "
            f"{self.numel} elements ({percent:.4g}%): {self.nan_count} NaN, "
            f"{self.posinf_count} +Inf, {self.neginf_count} -Inf in the float32 sum, and "
            f"{self.overflow_count} finite in float32 but beyond {dtype_name}'s range "
            f"(|x| > {self.dtype_max:g}). First bad element at index {self.first_index}. "
            f"The layer was not changed. What to try: {_advice(self.dtype)}"
        )


def _advice(dtype: torch.dtype) -> str:
    fixes = "check the adapter for NaN/Inf (a training blow-up or a corrupt file); lower the scale"
    wider = {
        torch.float16: "bfloat16 or float32",
        torch.bfloat16: "float32",
        torch.float8_e4m3fn: "bfloat16 or float32",
        torch.float8_e5m2: "bfloat16 or float32",
    }.get(dtype)
    if wider is None:
        return fixes + "."
    return f"{fixes}; or keep this layer in a wider dtype ({wider})."


class _PathError(SafemergeError, ValueError):
    """An error about a file or directory: its path, a short reason code, maybe a key."""

    def __init__(
        self, message: str, *, path: str | Path, reason: str, key: str | None = None
    ) -> None:
        self.path = Path(str(path))
        self.reason = reason
        self.key = key
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments: pickling (pytest-xdist, multiprocessing) needs this.
        return _rebuild_path_error, (type(self), str(self), self.path, self.reason, self.key)


def _rebuild_path_error(
    kind: type[_PathError], message: str, path: Path, reason: str, key: str | None
) -> _PathError:
    return kind(message, path=path, reason=reason, key=key)


class CheckpointError(_PathError):
    """A model or adapter file cannot be read safely; nothing was loaded from it.

    Attributes:
        path: the file (or directory) at fault.
        reason: a short code for tests and reports: ``"missing"``, ``"no-safetensors"``,
            ``"ambiguous"``, ``"pickled"``, ``"corrupt"``, ``"truncated"``, ``"unsafe-path"``,
            ``"missing-shard"``, ``"missing-tensor"``, ``"unlisted-tensor"``,
            ``"duplicate"``, ``"bad-index"`` or ``"unsupported-dtype"``.
        key: the tensor name (or index entry) concerned, when there is one.
    """


class AdapterFormatError(SafemergeError, ValueError):
    """An adapter file's keys do not map, one to one and with fitting shapes, onto the base.

    Attributes:
        path: the adapter file or directory.
        problems: ``(key, what is wrong)`` for every offending key, in the order found.
    """

    def __init__(
        self, path: str | Path, problems: Sequence[tuple[str, str]], *, cap: int = 20
    ) -> None:
        self.path = Path(str(path))
        self.problems = tuple(problems)
        shown = "\n".join(f"  {key}: {what}" for key, what in self.problems[:cap])
        more = len(self.problems) - cap
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"adapter {self.path} does not fit the base model: {len(self.problems)} "
            f"key(s) refused, nothing was loaded:\n{shown}{tail}\n"
            f"Check that the adapter was trained for this base model (same architecture and "
            f"weight names) and that the file is complete."
        )
        self.cap = cap

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild_adapter_format_error, (self.path, self.problems, self.cap)


def _rebuild_adapter_format_error(
    path: Path, problems: Sequence[tuple[str, str]], cap: int
) -> AdapterFormatError:
    return AdapterFormatError(path, problems, cap=cap)


class ModelWriteError(_PathError):
    """A merged model cannot be written; nothing was left under its path.

    Attributes:
        path: the model directory that was to be written.
        reason: a short code for tests and reports: ``"exists"`` (the output is already
            there), ``"plan-mismatch"`` (a tensor differs from the plan, or is missing or
            extra), ``"bad-plan"`` (a bad shard size, a name twice, nothing to write),
            ``"same-as-input"`` (the output would overwrite an input) or ``"disk-space"``.
        key: the tensor concerned, when there is one.
    """


class ModelFuseError(SafemergeError, ValueError):
    """A whole-model fuse was refused, or failed and was rolled back; the model is unchanged.

    Attributes:
        problems: ``(layer, what is wrong)`` for every offending layer, in model order.
        path: the base model's file or directory, when fusing files.
        rolled_back: layers fused and then restored, bit for bit, in reverse order.
    """

    def __init__(
        self,
        message: str,
        *,
        problems: Sequence[tuple[str, str]],
        path: str | Path | None = None,
        rolled_back: Sequence[str] = (),
    ) -> None:
        self.problems = tuple(problems)
        self.path = None if path is None else Path(str(path))
        self.rolled_back = tuple(rolled_back)
        super().__init__(message)

    @property
    def layers(self) -> tuple[str, ...]:
        """The offending layers' names."""
        return tuple(layer for layer, _ in self.problems)

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild_model_fuse_error, (str(self), self.problems, self.path, self.rolled_back)


def _rebuild_model_fuse_error(
    message: str,
    problems: Sequence[tuple[str, str]],
    path: Path | None,
    rolled_back: Sequence[str],
) -> ModelFuseError:
    return ModelFuseError(message, problems=problems, path=path, rolled_back=rolled_back)
