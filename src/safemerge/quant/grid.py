"""The 4-bit quantizers' code grids and the rounding bound they imply (pure math).

bitsandbytes' blockwise 4-bit quantization stores, per block of ``blocksize`` values, the
block's absmax ``s`` and for each value the index of the nearest code ``c`` to ``y / s``;
dequantizing gives ``c * s``. With ``h`` the largest half-gap between adjacent codes,
``|c * s - y| <= h * s``. When the absmax itself is stored quantized (nested, "double
quantization"), the dequantized value is ``c * s_stored`` and, as ``|c| <= 1``, the error
grows by at most ``|s_stored - s|``.
"""

from __future__ import annotations

import itertools

import torch

from safemerge.merge.numerics import U32

#: bitsandbytes' NF4 code (normal-float quantiles), in storage order.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

#: bitsandbytes' FP4 code (e2m1 with a subnormal), in storage order.
FP4_CODE = (
    0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
    0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25,
)  # fmt: skip

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def largest_half_gap(quant_type: str) -> float:
    """Half the widest gap between adjacent codes: 0.1519 for NF4, 0.1667 for FP4."""
    grid = sorted(set(CODES[quant_type]))
    return max(high - low for low, high in itertools.pairwise(grid)) / 2


def block_bounds(
    ideal: torch.Tensor,
    blocksize: int,
    quant_type: str,
    stored_absmax: torch.Tensor | None = None,
    true_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block bound on ``|dequantize(quantize(ideal)) - ideal|`` (float64, one per block).

    Args:
        ideal: the float32 values that were quantized, in bitsandbytes' flat order.
        blocksize: values per absmax block.
        quant_type: ``"nf4"`` or ``"fp4"``.
        stored_absmax: the absmax values as dequantization sees them (one per block);
            when nested, they differ from the true absmax and the difference is added.
        true_absmax: ``max|ideal|`` per block (float32) when the quantizer already has it;
            computed from ``ideal`` otherwise.

    The half-gap bound gains ``2u`` times the absmax for the float32 division that picks
    a code (a value within rounding of a midpoint may go either way) and the float32
    product that dequantizes.
    """
    if true_absmax is None:
        true_absmax = blocks_of(ideal.reshape(-1).abs(), blocksize).amax(dim=1)
    absmax = true_absmax.to(torch.float64)
    bounds = (largest_half_gap(quant_type) + 2 * U32) * absmax
    if stored_absmax is not None:
        bounds = bounds + (stored_absmax.to(torch.float64).reshape(-1) - absmax).abs()
    return bounds


def blockwise_bound(
    ideal: torch.Tensor,
    blocksize: int,
    quant_type: str,
    stored_absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`block_bounds` repeated for every element of its block (float64, flat)."""
    bounds = block_bounds(ideal, blocksize, quant_type, stored_absmax)
    return bounds.repeat_interleave(blocksize)[: ideal.numel()]


def blocks_of(flat: torch.Tensor, size: int) -> torch.Tensor:
    """A flat tensor as rows of ``size`` (the last one padded with zeros)."""
    padding = (-flat.numel()) % size
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.reshape(-1, size)
