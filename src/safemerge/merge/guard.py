"""The one finiteness guard every fuse path calls, and the error it builds on refusal.

A float32 merge ``y`` casts to a finite, in-range value of ``dtype`` exactly when
``|y| < overflow_threshold(dtype)`` (NaN fails every comparison). So one min/max pass over
the float32 block decides what the cast result will be, everywhere in the block, for
every dtype: for float32/float16/bfloat16/float8_e5m2 it is the same as testing the cast
result for NaN and +-Inf, and for float8_e4m3fn, whose cast saturates to +-448 instead of
overflowing, it is the only way to see the overflow at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from safemerge.errors import NonFiniteMergeError
from safemerge.merge.numerics import overflow_threshold, unravel


def block_fits(merged: torch.Tensor, threshold: float) -> bool:
    """True when every element of the float32 ``merged`` casts finite and in range."""
    return bool(block_fits_on_device(merged, threshold))


def block_fits_on_device(merged: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`block_fits` as a boolean tensor on ``merged``'s device: no wait for the
    device, so that a GPU fuse can read its verdicts once per layer."""
    if merged.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=merged.device)
    low, high = torch.aminmax(merged)
    # NaN in the block makes aminmax NaN, and every comparison with NaN is False.
    return (low > -threshold) & (high < threshold)


def non_finite_error(
    blocks: Iterable[torch.Tensor],
    *,
    layer: str,
    tensor: str,
    dtype: torch.dtype,
    shape: Sequence[int],
) -> NonFiniteMergeError:
    """Count what is wrong over all of a tensor's float32 merge blocks (in row-major order).

    Args:
        blocks: the float32 merged values, consecutive pieces of the tensor in row-major
            order (any shapes; only their order and sizes matter).
        layer, tensor, dtype, shape: what the error reports.
    """
    threshold = overflow_threshold(dtype)
    nan = posinf = neginf = overflow = 0
    first_flat: int | None = None
    offset = 0
    for block in blocks:
        flat = block.reshape(-1)
        nan += int(torch.isnan(flat).sum())
        posinf += int((flat == float("inf")).sum())
        neginf += int((flat == float("-inf")).sum())
        overflow += int((torch.isfinite(flat) & (flat.abs() >= threshold)).sum())
        if first_flat is None:
            bad = ~(flat.abs() < threshold)
            if bool(bad.any()):
                first_flat = offset + int(bad.nonzero()[0, 0])
        offset += flat.numel()
    first_index = unravel(first_flat if first_flat is not None else 0, shape)
    return NonFiniteMergeError(
        layer=layer,
        tensor=tensor,
        dtype=dtype,
        shape=shape,
        nan_count=nan,
        posinf_count=posinf,
        neginf_count=neginf,
        overflow_count=overflow,
        first_index=first_index,
    )


def check_vector(merged: torch.Tensor, *, layer: str, tensor: str, dtype: torch.dtype) -> None:
    """Raise NonFiniteMergeError unless a small float32 ``merged`` tensor fits ``dtype``."""
    if not block_fits(merged, overflow_threshold(dtype)):
        raise non_finite_error(
            [merged], layer=layer, tensor=tensor, dtype=dtype, shape=merged.shape
        )
