"""Cases built on a real model's weights: generated adapters, a planted NaN, a cast overflow
at the weight's largest element, and the output check of a real adapter's merge.

A weight of any layer kind is checked as an ``(out, in)`` matrix (a convolution's kernel
folded into ``in``); a real adapter is put in that form by ``safemerge.matrix_form``.
"""

from __future__ import annotations

import math

import torch

import safemerge
from pytest_safemerge.strategies import MergeCase

RANK = 8
_F32_MAX = float(torch.finfo(torch.float32).max)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def generated_cases(matrix: torch.Tensor, count: int, *, seed: int) -> list[MergeCase]:
    """``count`` random rank-8 adapters of growing strength, scales of both signs."""
    out_features, in_features = (int(size) for size in matrix.shape)
    spread = float(matrix.float().std()) if matrix.numel() > 1 else 1.0
    spread = spread if math.isfinite(spread) and spread > 0 else 1.0
    generator = torch.Generator().manual_seed(seed)
    strengths = (1e-2, 1e-1, 1.0, 1e-3)
    scales = (1.0, -0.5, 2.0, 1e-3)
    cases = []
    for index in range(count):
        rank = min(RANK, out_features, in_features)
        lora_A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        lora_B = torch.randn(out_features, rank, generator=generator)
        lora_B *= spread * strengths[index % len(strengths)]
        adapter = safemerge.LoraAdapter(lora_A, lora_B)
        cases.append(MergeCase(matrix, adapter, scales[index % len(scales)], "random"))
    return cases


def poisoned_cases(matrix: torch.Tensor, *, seed: int) -> list[MergeCase]:
    """A NaN in the last element of lora_B and a +Inf in the first of lora_A."""
    base = generated_cases(matrix, 2, seed=seed)
    first, second = base
    first.adapter.lora_B.view(-1)[-1] = math.nan
    second.adapter.lora_A.view(-1)[0] = math.inf
    return [
        MergeCase(matrix, first.adapter, 1.0, "nan", "nan at the last element of lora_B"),
        MergeCase(matrix, second.adapter, 1.0, "+inf", "+inf at the first element of lora_A"),
    ]


def cast_overflow_case(matrix: torch.Tensor) -> MergeCase | None:
    """A rank-1 adapter that pushes the weight's largest element just past its dtype's
    range while the float32 sum stays finite (None for a float32 weight)."""
    threshold = safemerge.numerics.overflow_threshold(matrix.dtype)
    if not math.isfinite(threshold):
        return None
    values = matrix.float()
    flat = int(values.abs().reshape(-1).argmax())
    row, column = divmod(flat, int(matrix.shape[1]))
    current = float(values[row, column])
    sign = 1.0 if current >= 0 else -1.0
    target = sign * min(1.5 * threshold, (threshold + _F32_MAX) / 2)
    lora_A = torch.zeros(1, int(matrix.shape[1]))
    lora_B = torch.zeros(int(matrix.shape[0]), 1)
    lora_A[0, column] = target - current
    lora_B[row, 0] = 1.0
    detail = (
        f"weight[{row}, {column}] = {current:g} pushed to {target:g}, beyond "
        f"{matrix.dtype}'s threshold {threshold:g}"
    )
    return MergeCase(matrix, safemerge.LoraAdapter(lora_A, lora_B), 1.0, "cast-overflow", detail)


def output_check(
    fused: torch.Tensor,
    matrix: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    bound: torch.Tensor,
    *,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merged layer's outputs ``x W'^T`` against the unmerged adapter's
    ``x W^T + scale (x A^T) B^T``, and the bound on their difference, for 8 random inputs.

    Both sides are computed in float64. ``|x (W' - W_exact)^T| <= |x| bound^T``, and each
    float64 product of length ``n`` adds at most ``gamma_n |x| |M|^T`` (``gamma_n =
    n u / (1 - n u)``, ``u = 2**-53``).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, int(matrix.shape[1]), generator=generator, dtype=torch.float64)
    w = matrix.detach().cpu().to(torch.float64)
    a = lora_A.detach().cpu().to(torch.float64)
    b = lora_B.detach().cpu().to(torch.float64)
    merged = fused.detach().cpu().to(torch.float64)
    merged_output = x @ merged.T
    unmerged_output = x @ w.T + scale * ((x @ a.T) @ b.T)
    u = 2.0**-53
    n = int(matrix.shape[1]) + int(a.shape[0]) + 2
    gamma = n * u / (1 - n * u)
    magnitude = x.abs() @ w.abs().T + abs(scale) * ((x.abs() @ a.abs().T) @ b.abs().T)
    rounding = gamma * (magnitude + x.abs() @ merged.abs().T)
    return merged_output, unmerged_output, x.abs() @ bound.T + rounding
