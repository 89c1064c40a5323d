"""Forward error bounds of the float32 merge, from the arithmetic (pure math on tensors).

The merge computes ``y = W + sum(c_i * left_i @ right_i)`` in float32 and casts it to the
weight's dtype. Each float32 operation rounds with relative error at most ``u = 2**-24``
(plus an absolute ``2**-149`` where results are subnormal), so the classic bound
``gamma_n = n*u / (1 - n*u)`` for ``n`` roundings in a row gives

    |fl(y) - y| <= gamma_n * (|W| + sum(|c_i| * |left_i| @ |right_i|)) + n * 2**-149

with ``n = rank + 2``: the coefficient folded into ``B`` (one rounding), then ``W`` plus
``rank`` products accumulated (``rank`` roundings, ``rank`` summed over the adapters),
and one to spare for an accumulation that adds ``W`` last. The coefficients' rounding to
float32 and underflow are added exactly (see :func:`accumulation_bound`). The cast adds half an ulp of the target
dtype at the float32 value's magnitude.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safemerge.merge.numerics import FLOAT32_TINY_SUBNORMAL, U32, ulp

Term = tuple[torch.Tensor, torch.Tensor, float]


def roundings(ranks: Sequence[int]) -> int:
    """Number of float32 roundings on the way to one merged element."""
    return sum(ranks) + 2


def gamma(n: int) -> float:
    """Higham's ``gamma_n``: the relative error bound of ``n`` successive roundings."""
    return n * U32 / (1.0 - n * U32)


def reference_merge(weight: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """``W + sum(c * left @ right)`` in float64 (exact up to float64 rounding)."""
    merged = weight.to(torch.float64).clone()
    for left, right, coefficient in terms:
        merged += coefficient * (left.to(torch.float64) @ right.to(torch.float64))
    return merged


def accumulation_bound(weight: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """Per-element bound on ``|float32 merge - exact merge|`` before the cast (float64).

    Three parts: ``gamma_n`` times the magnitudes involved; the coefficients' own rounding
    to float32, exactly (a coefficient below float32's range rounds to 0: all of its term
    is then error); and underflow, where a rounding's error is absolute, not relative:
    half the smallest subnormal per rounding, and for the coefficient folded into ``B``,
    that much times the ``A`` entries it multiplies.
    """
    magnitude = weight.to(torch.float64).abs()
    coefficient_error = torch.zeros_like(magnitude)
    underflow = torch.zeros_like(magnitude)
    for left, right, coefficient in terms:
        products = left.to(torch.float64).abs() @ right.to(torch.float64).abs()
        rounded = float(torch.tensor(coefficient, dtype=torch.float32))
        magnitude = magnitude + abs(rounded) * products
        coefficient_error = coefficient_error + abs(coefficient - rounded) * products
        underflow = underflow + FLOAT32_TINY_SUBNORMAL / 2 * right.to(torch.float64).abs().sum(
            dim=0
        )
    n = roundings([left.shape[1] for left, _, _ in terms])
    return gamma(n) * magnitude + coefficient_error + underflow + n * FLOAT32_TINY_SUBNORMAL


def cast_bound(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of ``dtype`` at each magnitude: the error of the final cast."""
    if dtype == torch.float32:
        return torch.zeros_like(magnitude, dtype=torch.float64)
    return ulp(magnitude, dtype) / 2


def merge_bound(
    weight: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge and the bound on the fused result's error, both float64.

    Returns:
        ``(reference, bound)`` with ``|fused - reference| <= bound`` for a correct merge.
    """
    reference, _, bound = merge_bound_parts(weight, terms, dtype)
    return reference, bound


def merge_bound_parts(
    weight: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`merge_bound` with the float32 part of the bound apart, all float64.

    Returns:
        ``(reference, accumulated, bound)``: the float32 merge ``y`` has
        ``|y - reference| <= accumulated`` (so its cast is finite exactly when ``|y|`` is
        below the dtype's overflow threshold), and the cast result is within ``bound``.
    """
    reference = reference_merge(weight, terms)
    accumulated = accumulation_bound(weight, terms)
    return reference, accumulated, accumulated + cast_bound(reference.abs() + accumulated, dtype)


def renormalised_bound(
    reference: torch.Tensor,
    accumulated: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    along_rows: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA: the exact ``m / ||y|| * y`` and its bound, given the plain merge's bound.

    The engine takes the norm of the float32 merge ``y32`` in float64, so the factor's
    relative error is at most ``rho = ||e|| / (||y|| - ||e||)`` (``e`` the accumulation
    bound; the float64 sum of ``k`` squares and the division add ``(k + 2) * 2**-52``);
    the factor stays float64, and the product with ``y32`` rounds once to float32
    (relatively, or by half a subnormal) before the final cast.
    """
    dim = 1 if along_rows else 0
    norms = torch.linalg.vector_norm(reference, dim=dim, keepdim=True)
    error_norms = torch.linalg.vector_norm(accumulated, dim=dim, keepdim=True)
    shape = (-1, 1) if along_rows else (1, -1)
    signed_factor = magnitude.to(torch.float64).reshape(shape) / norms
    factor = signed_factor.abs()
    rho = error_norms / (norms - error_norms).clamp_min(0)
    float64_error = (reference.shape[dim] + 2) * 2.0**-52
    factor_high = factor * (1 + rho) * (1 + float64_error)
    values_high = reference.abs() + accumulated
    bound = (
        values_high * (factor_high - factor)
        + factor * accumulated
        + U32 * factor_high * values_high
        + FLOAT32_TINY_SUBNORMAL / 2
    )
    exact = signed_factor * reference
    return exact, bound + cast_bound(exact.abs() + bound, dtype)
