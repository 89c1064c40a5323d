"""Facts about floating-point dtypes: ranges, ulps, and bit patterns as ordered integers.

Pure math on torch tensors; nothing here knows about layers or adapters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from safemerge.names import WEIGHT_DTYPES, listed

#: Weight dtypes safemerge fuses into. The merge itself is always computed in float32.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(getattr(torch, name) for name in WEIGHT_DTYPES)

#: Explicit mantissa bits (precision minus one) of each supported dtype.
MANTISSA_BITS: dict[torch.dtype, int] = {
    torch.float32: 23,
    torch.float16: 10,
    torch.bfloat16: 7,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 2,
}

#: Unit roundoff of float32 (half its machine epsilon): the relative error of one rounding.
U32 = 2.0**-24

#: Smallest positive float32 subnormal: the absolute error floor of one float32 rounding.
FLOAT32_TINY_SUBNORMAL = 2.0**-149

_INT_VIEW: dict[int, torch.dtype] = {1: torch.int8, 2: torch.int16, 4: torch.int32}
_WIDE_INT: dict[int, torch.dtype] = {1: torch.int32, 2: torch.int32, 4: torch.int64}


def check_supported(dtype: torch.dtype) -> None:
    """Raise TypeError unless ``dtype`` is a weight dtype safemerge fuses into."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"weights of dtype {dtype} cannot be fused; supported dtypes: {listed(WEIGHT_DTYPES)}"
        )


def overflow_threshold(dtype: torch.dtype) -> float:
    """Smallest float32 magnitude that does not fit ``dtype`` after round-to-nearest.

    The cast of ``x`` to ``dtype`` is finite and in range exactly when ``|x|`` is below
    this value: ``max + ulp(max)/2`` for formats whose largest value has an odd
    significand (a tie there rounds away, to Inf), the next float32 above it when the
    significand is even (float8_e4m3fn: the tie rounds down to 448). float8_e4m3fn has
    no Inf and torch's cast saturates, so this threshold is how its overflow is seen.
    """
    if dtype == torch.float32:
        return math.inf
    largest = float(torch.finfo(dtype).max)
    ulp_at_max = 2.0 ** (math.floor(math.log2(largest)) - MANTISSA_BITS[dtype])
    tie = largest + ulp_at_max / 2
    largest_significand_is_odd = int(largest / ulp_at_max) % 2 == 1
    if largest_significand_is_odd:
        return tie
    return float(torch.nextafter(torch.tensor(tie), torch.tensor(math.inf)))


#: Where float32's own rounding overflows: ``max + ulp(max)/2`` (the largest float32 has an
#: odd significand, so a tie there rounds away, to Inf).
FLOAT32_RANGE_LIMIT = float(torch.finfo(torch.float32).max) + 2.0**103


def range_limit(dtype: torch.dtype) -> float:
    """Smallest magnitude, exact (as float64 holds it), that does not round to a finite
    ``dtype`` value: :func:`overflow_threshold`, and for float32, whose values always fit
    float32, :data:`FLOAT32_RANGE_LIMIT`. Finite for every supported dtype.
    """
    if dtype == torch.float32:
        return FLOAT32_RANGE_LIMIT
    return overflow_threshold(dtype)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s grid at each magnitude in ``values`` (float64 result).

    Subnormal magnitudes get the subnormal spacing; the result never underflows to 0.
    """
    info = torch.finfo(dtype)
    mantissa = MANTISSA_BITS[dtype]
    smallest_normal_exponent = math.log2(info.smallest_normal)
    magnitude = values.to(torch.float64).abs()
    exponent = torch.floor(torch.log2(magnitude.clamp_min(info.smallest_normal)))
    exponent = exponent.clamp_min(smallest_normal_exponent)
    return torch.exp2(exponent - mantissa)


def unravel(flat_index: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The index into a tensor of ``shape`` of its ``flat_index``-th element (row-major)."""
    index: list[int] = []
    for size in reversed(tuple(shape)):
        index.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(index))


def int_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a signed integer tensor of the same width (no copy)."""
    return tensor.view(_INT_VIEW[tensor.element_size()])


def ordered_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Map each float's bit pattern to an integer whose order is the float order.

    Adjacent representable floats map to adjacent integers, so the difference of two
    ordered values counts ulps. +0.0 maps to 0 and -0.0 to -1, keeping the map a
    bijection on bit patterns (restoring from it gives back the sign of zero too).
    """
    width = tensor.element_size()
    bits = int_view(tensor).to(_WIDE_INT[width])
    magnitude_mask = (1 << (8 * width - 1)) - 1
    return torch.where(bits < 0, -(bits & magnitude_mask) - 1, bits)


def from_ordered_bits(ordered: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`ordered_bits`: build the ``dtype`` tensor with those patterns."""
    width = torch.empty((), dtype=dtype).element_size()
    sign_bit = 1 << (8 * width - 1)
    magnitude = torch.where(ordered < 0, -(ordered + 1), ordered)
    bits = torch.where(ordered < 0, magnitude - sign_bit, magnitude)
    return bits.to(_INT_VIEW[width]).view(dtype)
