"""Dtype facts and the values the builders share: rounding to a dtype, seeded tensors, bit
patterns, and the planting and overflow helpers of the adversarial cases.

The bulk of a tensor comes from a drawn seed through ``torch.Generator`` (fast at any
size); what a property hinges on is drawn by Hypothesis by the callers.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from safemerge.merge.numerics import SUPPORTED_DTYPES, int_view, overflow_threshold

FP16_MAX = 65504.0
F32_MAX = float(torch.finfo(torch.float32).max)
#: The dtypes an adapter's factors may have.
ADAPTER_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Weight dtypes whose finite range is narrower than float32's (bfloat16's max is a little
#: below float32's): a float32 sum or delta can be finite and still beyond their range.
NARROW_DTYPES: tuple[torch.dtype, ...] = tuple(d for d in SUPPORTED_DTYPES if d != torch.float32)
#: Standard deviations of the seeded bulk of weights and adapters (first is the shrink target).
STDS = (1.0, 0.02, 1e-3, 0.0, 30.0)

SEEDS: SearchStrategy[int] = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return float(info.smallest_normal) * float(info.eps)


def representable(value: float, dtype: torch.dtype) -> float:
    """The ``dtype`` value nearest to ``value``, never past ``dtype``'s largest finite value.

    ``value`` (a Python float, i.e. float64) is rounded once, to nearest with ties to even,
    to the precision ``dtype`` has at that magnitude (its subnormals included); a result
    beyond ``torch.finfo(dtype).max`` in magnitude, and +-Inf, give ``+-finfo(dtype).max``.
    Zeros, and values that round to zero, keep their sign. NaN raises ``ValueError``.

    The result is exact in ``dtype`` and in every wider float dtype, so writing it into a
    tensor of ``dtype``, float32 or float64 stores exactly this number. Unlike a torch cast
    it never overflows to Inf (float16, bfloat16, float8_e5m2) or NaN, and it rounds once:
    torch casts float64 to the narrow dtypes through float32, which can round twice.
    """
    if math.isnan(value):
        raise ValueError(f"representable({value!r}, {dtype}): NaN has no nearest value")
    info = torch.finfo(dtype)
    largest = float(info.max)
    magnitude = abs(value)
    if magnitude >= largest:
        return math.copysign(largest, value)
    if magnitude == 0:
        return value
    # The spacing of dtype's values in the binade of |value| (subnormals: the smallest one's).
    lowest_exponent = round(math.log2(float(info.smallest_normal)))
    exponent = max(math.frexp(magnitude)[1] - 1, lowest_exponent)
    spacing = math.ldexp(float(info.eps), exponent)
    rounded = min(round(magnitude / spacing) * spacing, largest)  # round(): ties to even
    return math.copysign(rounded, value)


def seeded_normal(
    shape: tuple[int, ...], std: float, dtype: torch.dtype, rng: torch.Generator
) -> torch.Tensor:
    """Normal values times ``std``, clamped to ``dtype``'s range and rounded into it."""
    values = torch.randn(shape, generator=rng) * std
    if dtype != torch.float32:
        values = values.clamp(-dtype_max(dtype), dtype_max(dtype))
    return values.to(dtype)


def seeded_factors(
    draw: st.DrawFn,
    out_features: int,
    in_features: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
    stds: SearchStrategy[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_A`` (rank, in) and ``lora_B`` (out, rank) of ``dtype`` from one drawn seed,
    each with a drawn standard deviation."""
    rng = generator(draw(SEEDS))
    stds = stds if stds is not None else st.sampled_from(STDS)
    lora_A = seeded_normal((rank, in_features), draw(stds), dtype, rng)
    lora_B = seeded_normal((out_features, rank), draw(stds), dtype, rng)
    return lora_A, lora_B


# --- bit patterns ---------------------------------------------------------------------------


def bit_width(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def largest_finite_magnitude_bits(dtype: torch.dtype) -> int:
    """The bit pattern of ``finfo(dtype).max``: every smaller magnitude pattern is finite."""
    largest = torch.tensor([dtype_max(dtype)], dtype=torch.float32).to(dtype)
    return int(int_view(largest).item())


def signed_pattern(negative: bool, magnitude: int, width: int) -> int:
    """The signed integer whose two's complement bits are ``sign | magnitude``."""
    return magnitude - (1 << (width - 1)) if negative else magnitude


def from_patterns(patterns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    int_dtype = int_view(torch.empty(0, dtype=dtype)).dtype
    return patterns.to(int_dtype).view(dtype)


def finite_patterns(dtype: torch.dtype) -> SearchStrategy[int]:
    """Signed bit patterns of finite ``dtype`` values; they shrink toward 0 bits (+0.0)."""
    width = bit_width(dtype)
    largest = largest_finite_magnitude_bits(dtype)
    return st.builds(
        lambda magnitude, negative: signed_pattern(negative, magnitude, width),
        st.integers(0, largest),
        st.booleans(),
    )


def special_values(dtype: torch.dtype) -> tuple[float, ...]:
    info = torch.finfo(dtype)
    tiny = smallest_subnormal(dtype)
    largest = float(info.max)
    return (0.0, -0.0, 1.0, -1.0, largest, -largest, float(info.smallest_normal), tiny, -tiny)


# --- planting and overflow ------------------------------------------------------------------


def plant_product(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    position: tuple[int, int, int],
    value: float,
) -> None:
    """Make rank component ``k`` of ``B @ A`` add exactly ``value`` at ``[i, j]`` and
    nothing elsewhere, for ``position = (i, k, j)``: ``A[k] = value * e_j``,
    ``B[:, k] = e_i`` (``value`` is stored as ``lora_A``'s dtype holds it)."""
    i, k, j = position
    lora_A[k], lora_B[:, k] = 0.0, 0.0
    lora_A[k, j] = value
    lora_B[i, k] = 1.0


def past_threshold(dtype: torch.dtype, fraction: float, ceiling: float) -> float:
    """A magnitude beyond ``dtype``'s overflow threshold (its max plus half an ulp there:
    the smallest magnitude a cast to ``dtype`` does not keep finite), ``fraction`` of the
    way from the threshold to ``ceiling``, rounded to float32 (so that a float32 tensor
    holds it exactly and it stays at most float32's max)."""
    threshold = overflow_threshold(dtype)
    return representable(threshold + fraction * (ceiling - threshold), torch.float32)


def planted_position(draw: st.DrawFn, shape: tuple[int, int], rank: int) -> tuple[int, int, int]:
    """``(i, k, j)``: the weight element ``[i, j]`` and the rank component ``k`` planted."""
    return (
        draw(st.integers(0, shape[0] - 1)),
        draw(st.integers(0, rank - 1)),
        draw(st.integers(0, shape[1] - 1)),
    )
