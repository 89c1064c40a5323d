"""The per-element bound check against the plain float64 one it replaced, and the fuse.

For Llama-shaped weights (``(out, in)`` = 5632x2048 and 2048x5632) in bfloat16, float16
and float32, with a rank-16 adapter (``left``, ``right`` ~ ``randn * 0.01``, coefficient
2), it times:

* ``old``: the check as it was before the float32 screen (a copy below, the baseline):
  every block's reference and bound in float64, one thread;
* ``new``: :func:`safemerge.merge.bound_check.worst_error_of_bound`;
* ``fuse``: :func:`safemerge.merge.engine.fuse_matrix` of the same weight
  (``keep_correction=False``: the fuse cost without the exact-unfuse correction).

The three take turns in every repeat, so slow spells of this shared machine fall on all
of them alike; each time is the best over the repeats. It prints ``old / new`` and
``new / fuse``, and checks that both checks report the same worst ratio. Run it from the
repository root::

    python benchmarks/bound_check.py              # 5 repeats
    python benchmarks/bound_check.py --repeats 9 --dtypes bfloat16 --threads 1

It is a benchmark, not a test: it always exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import torch

from safemerge.merge import bound_check, bounds, engine
from safemerge.merge.numerics import FLOAT32_TINY_SUBNORMAL, MANTISSA_BITS

SHAPES: tuple[tuple[int, int], ...] = ((5632, 2048), (2048, 5632))
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
RANK = 16

# -- the baseline: the check before the screen, verbatim but for names ----------------------

_OLD_BLOCK_ELEMENTS = 1 << 16


def old_worst_error_of_bound(
    original: torch.Tensor,
    fused: torch.Tensor,
    terms: Sequence[bounds.Term],
    dtype: torch.dtype,
) -> float:
    rows, columns = original.shape
    step = max(1, _OLD_BLOCK_ELEMENTS // max(columns, 1))
    worst = 0.0
    with engine.pinned_threads(1):
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            block_terms = [(left[start:stop], right, c) for left, right, c in terms]
            reference, bound = _old_block_bound(original[start:stop], block_terms, dtype)
            error = fused[start:stop].to(torch.float64).sub_(reference).abs_()
            worst = max(worst, float(error.div_(bound).max()) if error.numel() else 0.0)
    return worst


def _old_block_bound(
    weight: torch.Tensor, terms: Sequence[bounds.Term], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    reference = bounds.reference_merge(weight, terms)
    n = bounds.roundings([left.shape[1] for left, _, _ in terms])
    gamma = bounds.gamma(n)
    lefts, rights = [], []
    underflow = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for left, right, coefficient in terms:
        rounded = float(torch.tensor(coefficient, dtype=torch.float32))
        right_abs = right.to(torch.float64).abs()
        lefts.append(
            left.to(torch.float64).abs() * (gamma * abs(rounded) + abs(coefficient - rounded))
        )
        rights.append(right_abs)
        underflow += right_abs.sum(dim=0) * (FLOAT32_TINY_SUBNORMAL / 2)
    underflow += n * FLOAT32_TINY_SUBNORMAL
    start = weight.to(torch.float64, copy=True).abs_().mul_(gamma).add_(underflow)
    bound = torch.addmm(start, torch.cat(lefts, dim=1), torch.cat(rights, dim=0))
    if dtype != torch.float32:
        bound += _old_half_ulp(reference.abs().add_(bound), dtype)
    return reference, bound


def _old_half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    smallest_normal = torch.finfo(dtype).smallest_normal
    bits = magnitude.clamp_(min=smallest_normal).view(torch.int64)
    exponent = bits.bitwise_right_shift_(52)
    exponent -= MANTISSA_BITS[dtype] + 1
    return exponent.bitwise_left_shift_(52).view(torch.float64)


# -- the measurement ------------------------------------------------------------------------


def _best_times(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for run in candidates.values():  # warm up
        run()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(shape: tuple[int, int], dtype: torch.dtype, repeats: int) -> None:
    rows, columns = shape
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
    left = torch.randn(rows, RANK, generator=generator) * 0.01
    right = torch.randn(RANK, columns, generator=generator) * 0.01
    terms: list[bounds.Term] = [(left, right, 2.0)]
    delta = engine.LowRankDelta.from_terms(terms, weight.device)

    def fuse() -> torch.Tensor | None:
        merged: torch.Tensor | None = engine.fuse_matrix(
            weight, delta, layer="w", weight_shape=shape, keep_correction=False
        ).merged
        return merged

    fused = fuse()
    assert fused is not None
    old = old_worst_error_of_bound(weight, fused, terms, dtype)
    new = bound_check.worst_error_of_bound(weight, fused, terms, dtype)
    times = _best_times(
        {
            "old": lambda: old_worst_error_of_bound(weight, fused, terms, dtype),
            "new": lambda: bound_check.worst_error_of_bound(weight, fused, terms, dtype),
            "fuse": fuse,
        },
        repeats,
    )
    name = f"{rows}x{columns} {str(dtype).removeprefix('torch.')}"
    print(
        f"{name:<20} old {times['old'] * 1e3:7.1f} ms  new {times['new'] * 1e3:7.1f} ms  "
        f"fuse {times['fuse'] * 1e3:6.1f} ms  old/new {times['old'] / times['new']:5.2f}  "
        f"new/fuse {times['new'] / times['fuse']:5.2f}  worst old {old:.12f} new {new:.12f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: as is)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
        f"intra-op threads, best of {args.repeats}, load average {os.getloadavg()[0]:.2f}"
    )
    for shape in SHAPES:
        for dtype_name in args.dtypes:
            measure(shape, DTYPES[dtype_name], args.repeats)


if __name__ == "__main__":
    main()
