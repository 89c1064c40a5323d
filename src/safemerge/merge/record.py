"""What a fuse did, kept so that unfuse can undo it (exactly, when asked to)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.correction import Correction


@dataclass(frozen=True, eq=False)
class FuseRecord:
    """The result of :func:`safemerge.fuse`; pass it to :func:`safemerge.unfuse`.

    Attributes:
        layer: the layer's name (or class name).
        kind: ``linear``, ``embedding``, ``conv1d``/``conv2d``/``conv3d`` or ``fan_in_fan_out``.
        dtype, shape: the weight's dtype and shape.
        adapters: the fused adapters with their per-adapter weights.
        scale: the overall scale they were fused with.
        coefficients: per adapter, ``weight * adapter.scale * scale``: what multiplied ``B @ A``.
        correction: the compact exact-unfuse correction of the weight, or None when the
            fuse was asked not to keep one.
        original_bias: a CPU copy of the bias before the fuse, when the fuse changed it.
        dora_factor: DoRA's per-output-channel ``magnitude / norm`` (float64), if any.
        num_threads: torch intra-op threads during the fuse (unfuse repeats them).
        block_rows: rows per block during the fuse (unfuse repeats them).
        fused_fingerprint: checksum of the fused weight, to detect later changes.
        seconds: wall time of the fuse.
    """

    layer: str
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    adapters: tuple[tuple[LoraAdapter, float], ...]
    scale: float
    coefficients: tuple[float, ...]
    correction: Correction | None
    original_bias: torch.Tensor | None
    dora_factor: torch.Tensor | None
    num_threads: int
    block_rows: int
    fused_fingerprint: int
    seconds: float

    @property
    def exact(self) -> bool:
        """Whether :func:`safemerge.unfuse` can restore every bit."""
        return self.correction is not None

    @property
    def nbytes(self) -> int:
        """Bytes kept to undo the fuse: correction, original bias and DoRA factors."""
        total = self.correction.nbytes if self.correction is not None else 0
        for tensor in (self.original_bias, self.dora_factor):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        return total

    @property
    def weight_nbytes(self) -> int:
        """Size of the weight itself, to put :attr:`nbytes` in proportion."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def escape_count(self) -> int:
        """Elements whose original bits the correction stores whole (more than 1 ulp off)."""
        return self.correction.escape_count if self.correction is not None else 0

    def summary(self) -> str:
        """One line for logs: what was fused, how long it took, what undoing it costs."""
        ranks = "+".join(str(adapter.rank) for adapter, _ in self.adapters)
        shape = "x".join(str(size) for size in self.shape)
        dtype = str(self.dtype).removeprefix("torch.")
        line = (
            f"{self.layer} ({self.kind}, {dtype} {shape}): fused rank {ranks} in "
            f"{self.seconds * 1e3:.1f} ms"
        )
        if self.correction is None:
            return line + "; no exact-unfuse correction kept"
        return (
            f"{line}; exact-unfuse correction {self.nbytes:,} bytes "
            f"({self.nbytes / self.weight_nbytes:.1%} of the weight, "
            f"{self.escape_count:,} elements kept whole)"
        )
