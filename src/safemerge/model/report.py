"""What a whole-model fuse did: one result per tensor, totals, and the process's peak memory."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safemerge.io.phases import PhaseTimes
from safemerge.merge.record import FuseRecord
from safemerge.model.memory import peak_rss_bytes
from safemerge.quant.quantized import QuantizedFuseRecord

#: ``TensorResult.kind`` of a tensor written as read (``"cast"`` when only its dtype changed).
UNCHANGED = "unchanged"
CAST = "cast"
#: ``TensorResult.kind`` of a layer's bias that its adapters' LoRA biases were added to.
BIAS = "bias"
#: ``TensorResult.kind`` of a Linear weight written bitsandbytes-quantized, no adapter fused.
QUANTIZED = "quantized"


@dataclass(frozen=True)
class TensorResult:
    """One tensor of a whole-model fuse: what was done to it, how accurately, how fast.

    Attributes:
        name: the tensor's name (``"...q_proj.weight"``).
        kind: the layer kind fused into (``"linear"``, ``"embedding"``, ``"conv2d"``,
            ``"fan_in_fan_out"``, ``"linear4bit"``...), ``"bias"`` for a bias a LoRA bias
            was added to, or ``"unchanged"`` / ``"cast"`` for a tensor only copied.
        shape: its shape (the logical ``(out, in)`` shape for a quantized layer).
        dtype: its dtype as written (or as held, for an in-memory module).
        worst_error_of_bound: the largest ``|fused - exact| / bound`` over every element
            of the fused weight (at most 1 for a correct fuse; the bound is
            :func:`safemerge.merge_bound`'s); None where no bound was checked (a tensor
            not fused, or a bias).
        seconds: time spent on it (read, cast, fuse, check; not the write).
        adapters: how many adapters were fused into it (0 when not fused).
        position: its 1-based position among the model's tensors.
        total: how many tensors the model has (for progress displays).
        qlora: for a layer fused with ``quant=`` or ``base_quant=``, how much of the
            adapter's effect each way of merging it keeps (plain JSON fields, see
            :meth:`safemerge.model.base_quant.QloraComparison.fields`); else None.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    worst_error_of_bound: float | None
    seconds: float
    adapters: int = 0
    position: int = 0
    total: int = 0
    qlora: Mapping[str, float | int | str | None] | None = None

    @property
    def fused(self) -> bool:
        """Whether adapters were fused into this weight (a layer's bias that got their LoRA
        biases is not counted apart: its weight is)."""
        return self.adapters > 0 and self.kind != BIAS

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


#: The name this class had before it was known to cover biases and copied tensors too.
LayerResult = TensorResult


@dataclass(frozen=True, eq=False)
class ModelFuseReport:
    """The result of :func:`safemerge.fuse_model` or :func:`safemerge.fuse_files`.

    Attributes:
        layers: one :class:`TensorResult` per tensor processed, in model order (for
            ``fuse_model``, the fused layers only).
        parameters: elements of every tensor processed (written, for ``fuse_files``).
        fused_parameters: elements of the weights adapters were fused into.
        tensors_written: tensors written to disk (0 for ``fuse_model``).
        seconds: wall time of the whole call.
        peak_rss_bytes: the process's peak resident memory (``VmHWM``) at the end, since
            the process started; 0 where the system does not say.
        output: the written model directory (None for ``fuse_model``).
        shard_count: weight files written (0 for ``fuse_model``).
        written_bytes: bytes of tensor data written.
        metadata: the provenance written into every shard's safetensors metadata.
        copied: files copied beside the weights, relative to the base directory.
        records: per fused layer, the record :func:`safemerge.unfuse_model` (or
            :func:`safemerge.unfuse`) needs to restore it exactly (``fuse_model`` only).
        phases: for a fuse written to disk, the seconds of ``seconds`` spent reading,
            fusing, checking, writing and waiting for fsync (the names of
            :data:`safemerge.io.phases.PHASES`); the rest (planning, checks up front,
            bookkeeping) is :attr:`other_seconds`. Empty where not measured.
    """

    layers: tuple[TensorResult, ...]
    parameters: int
    fused_parameters: int
    tensors_written: int
    seconds: float
    peak_rss_bytes: int
    output: Path | None = None
    shard_count: int = 0
    written_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    copied: tuple[str, ...] = ()
    records: dict[str, FuseRecord | QuantizedFuseRecord] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def in_memory(
        cls,
        results: Sequence[TensorResult],
        records: dict[str, FuseRecord | QuantizedFuseRecord],
        *,
        seconds: float,
    ) -> ModelFuseReport:
        """The report of a fuse into a module in memory: nothing written, every layer fused."""
        parameters = sum(result.numel for result in results)
        return cls(
            layers=tuple(results),
            parameters=parameters,
            fused_parameters=parameters,
            tensors_written=0,
            seconds=seconds,
            peak_rss_bytes=peak_rss_bytes(),
            records=records,
        )

    @classmethod
    def on_disk(
        cls,
        results: Sequence[TensorResult],
        *,
        started: float,
        output: Path,
        tensors_written: int,
        shard_count: int,
        written_bytes: int,
        metadata: dict[str, str],
        copied: tuple[str, ...],
        phases: PhaseTimes | None = None,
    ) -> ModelFuseReport:
        """The report of a fuse written to disk (``fuse_files``, ``export_files``), timed
        from ``started`` (a ``time.perf_counter()`` reading) to now, with the ``phases``
        measured on the way."""
        return cls(
            layers=tuple(results),
            parameters=sum(result.numel for result in results),
            fused_parameters=sum(result.numel for result in results if result.fused),
            tensors_written=tensors_written,
            seconds=time.perf_counter() - started,
            peak_rss_bytes=peak_rss_bytes(),
            output=output,
            shard_count=shard_count,
            written_bytes=written_bytes,
            metadata=metadata,
            copied=copied,
            phases={} if phases is None else dict(phases.seconds),
        )

    @property
    def fused(self) -> tuple[TensorResult, ...]:
        """The results of the weights adapters were fused into: one per fused layer."""
        return tuple(layer for layer in self.layers if layer.fused)

    @property
    def other_seconds(self) -> float:
        """The time not in any of :attr:`phases` (0.0 when no phase was measured)."""
        return max(0.0, self.seconds - sum(self.phases.values())) if self.phases else 0.0

    @property
    def parameters_per_second(self) -> float:
        return self.parameters / self.seconds if self.seconds > 0 else float("inf")

    @property
    def worst_error_of_bound(self) -> float:
        """The largest per-layer ``worst_error_of_bound`` (0.0 when no bound was checked)."""
        checked = [layer.worst_error_of_bound for layer in self.layers]
        return max((value for value in checked if value is not None), default=0.0)

    def summary(self) -> str:
        """A few lines for logs and the command line."""
        fused = self.fused
        where = f" into {self.output} ({self.shard_count} file(s))" if self.output else ""
        lines = [
            f"fused {len(fused)} layer(s) ({self.fused_parameters:,} parameters) of "
            f"{self.parameters:,} parameters{where} in {self.seconds:.2f} s "
            f"({self.parameters_per_second:,.0f} parameters/s); worst error "
            f"{self.worst_error_of_bound:.3f} of its bound; peak memory "
            f"{self.peak_rss_bytes / 2**20:,.0f} MiB"
        ]
        if self.tensors_written:
            lines.append(
                f"wrote {self.tensors_written} tensor(s), {self.written_bytes:,} bytes"
                + (f"; copied {len(self.copied)} other file(s)" if self.copied else "")
            )
        return "\n".join(lines)
