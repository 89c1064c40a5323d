"""One LoRA adapter for one layer: its two factors, its scale, and its options."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from safemerge.errors import AdapterConfigError


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter for one layer, in PEFT's layout.

    ``lora_A`` is ``(rank, in_features)`` and ``lora_B`` is ``(out_features, rank)``; for a
    convolution, ``lora_A`` has the layer's kernel ``(rank, in_channels, *kernel)`` and
    ``lora_B`` is ``(out_channels, rank, 1, ...)``. For an embedding, ``in_features`` is the
    number of embeddings and ``out_features`` the embedding size (PEFT's
    ``lora_embedding_A``/``lora_embedding_B``).

    Args:
        lora_A: the down projection.
        lora_B: the up projection.
        alpha: LoRA alpha; ``None`` means alpha = rank (scale 1).
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        lora_bias: a bias of shape ``(out_features,)`` carried by ``lora_B`` (PEFT's
            ``lora_bias=True``), added to the layer's bias times the scale.
        magnitude: DoRA magnitude vector with ``out_features`` elements.
        fan_in_fan_out: the layer stores its weight transposed, ``(in, out)``
            (GPT-2's ``Conv1D``).

    Raises:
        AdapterConfigError: when shapes, rank or alpha are inconsistent.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float | None = None
    use_rslora: bool = field(default=False, kw_only=True)
    lora_bias: torch.Tensor | None = field(default=None, kw_only=True)
    magnitude: torch.Tensor | None = field(default=None, kw_only=True)
    fan_in_fan_out: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def in_features(self) -> int:
        """Input size: ``lora_A.shape[1]`` (input channels for a convolution)."""
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """The convolution kernel of ``lora_A``; ``()`` for a linear adapter."""
        return tuple(int(size) for size in self.lora_A.shape[2:])

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        alpha = float(self.rank) if self.alpha is None else float(self.alpha)
        if self.use_rslora:
            return alpha / math.sqrt(self.rank)
        return alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def up_matrix(self) -> torch.Tensor:
        """``lora_B`` as an ``(out_features, rank)`` matrix."""
        return self.lora_B.reshape(self.out_features, self.rank)

    def down_matrix(self) -> torch.Tensor:
        """``lora_A`` as a ``(rank, in_features * prod(kernel))`` matrix."""
        return self.lora_A.reshape(self.rank, -1)


def _validate(adapter: LoraAdapter) -> None:
    lora_A, lora_B = adapter.lora_A, adapter.lora_B
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(tensor, torch.Tensor):
            raise AdapterConfigError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise AdapterConfigError(
                f"{name} must be a floating-point tensor, got dtype {tensor.dtype}"
            )
    if lora_A.ndim < 2 or lora_A.ndim != lora_B.ndim:
        raise AdapterConfigError(
            f"lora_A and lora_B must both be matrices (or both conv kernels of the same rank); "
            f"got lora_A.shape={tuple(lora_A.shape)}, lora_B.shape={tuple(lora_B.shape)}"
        )
    rank = lora_A.shape[0]
    if rank < 1:
        raise AdapterConfigError(f"rank must be at least 1; lora_A.shape={tuple(lora_A.shape)}")
    if lora_B.shape[1] != rank:
        raise AdapterConfigError(
            f"rank mismatch: lora_A.shape={tuple(lora_A.shape)} has rank {rank} (dim 0) but "
            f"lora_B.shape={tuple(lora_B.shape)} has rank {lora_B.shape[1]} (dim 1); "
            f"lora_A must be (rank, in) and lora_B (out, rank): are they swapped?"
        )
    if any(size != 1 for size in lora_B.shape[2:]):
        raise AdapterConfigError(
            f"a conv adapter's lora_B must have a 1x1 kernel; got lora_B.shape={tuple(lora_B.shape)}"
        )
    if adapter.alpha is not None and not math.isfinite(float(adapter.alpha)):
        raise AdapterConfigError(f"alpha must be finite; got alpha={adapter.alpha}")
    out_features = lora_B.shape[0]
    for name, vector in (("lora_bias", adapter.lora_bias), ("magnitude", adapter.magnitude)):
        if vector is not None and vector.numel() != out_features:
            raise AdapterConfigError(
                f"{name} must have out_features={out_features} elements (lora_B.shape[0]); "
                f"got {name}.shape={tuple(vector.shape)}"
            )
