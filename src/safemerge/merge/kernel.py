"""The engine's one-pass block kernel, where it is built, and the switch to do without it.

``_blockops`` (C, built with the package when a compiler is there; see ``_blockops.c``)
does a block's merge, guard, cast and exact-unfuse correction in one vectorised pass over
memory, where the same arithmetic in torch ops takes five passes, several of them
mixed-dtype. It computes exactly what the torch ops compute, bit for bit: the engine keeps
the torch code as the reference and as the fallback (no compiler, float8 weights, DoRA's
factor, rows that are not contiguous, any device other than the CPU), and the tests run
both and compare every bit.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch

from safemerge.merge.numerics import MANTISSA_BITS


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("safemerge.merge._blockops")
    except ImportError:  # built without a C compiler: the torch ops do the same work
        return None


_blockops = _load()

_KINDS: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_enabled = True


def compiled() -> bool:
    """Whether the compiled kernel is built and switched on."""
    return _blockops is not None and _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the engine on its torch-op path only (for tests and benchmarks)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def sequential_product(matrix: torch.Tensor, has_factor: bool) -> bool:
    """Whether ``matrix``'s blocks take the kernel's product (:func:`rank_product`), built
    or not: a CPU float32, float16 or bfloat16 matrix without DoRA's factor. The rest (the
    float8 types, DoRA, other devices) take torch's matmul, fast wherever torch runs.

    This depends on nothing but the matrix and the factor, so a fuse and its unfuse
    always agree on it, even on machines where one has the compiled kernel and the other
    not: the kernel and :func:`rank_product` give the same bits.
    """
    return matrix.device.type == "cpu" and matrix.dtype in _KINDS and not has_factor


def applies(matrix: torch.Tensor, has_factor: bool) -> bool:
    """Whether the compiled kernel does ``matrix``'s blocks: it is built and switched on,
    the product is the sequential one, and the rows are contiguous."""
    if _blockops is None or not _enabled or not sequential_product(matrix, has_factor):
        return False
    if matrix.dtype == torch.float16 and not _blockops.has_float16():
        return False
    return matrix.dim() == 2 and (matrix.stride(1) == 1 or matrix.shape[1] <= 1)


def fuse_block(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out: torch.Tensor,
    *,
    codes: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    escapes: torch.Tensor | None = None,
) -> int | None:
    """``out = cast(weight + left @ right)``, the product computed as :func:`rank_product`
    does; with ``codes`` (a uint8 scratch of a byte per element), also the packed
    correction codes into ``packed`` and the escaped original bits into ``escapes``.

    Returns:
        None when some fused element is not finite in the dtype, else the number of
        escapes written (0 without a correction).
    """
    assert _blockops is not None
    kept = _blockops.fuse_block(
        *_block_arguments(weight, left, right, out, codes, packed),
        _address(escapes),
    )
    return None if kept < 0 else int(kept)


def unfuse_block(
    fused: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out: torch.Tensor,
    *,
    codes: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    escapes: torch.Tensor | None = None,
) -> int | None:
    """``out = cast(fused - left @ right)``, corrected to the original bits when ``codes`` (a
    uint8 scratch) is given with the block's ``packed`` codes and ``escapes``.

    Returns:
        Without a correction, None when some element is not finite, else 0; with one, the
        number of escapes used. ``out`` may be ``fused`` itself.
    """
    assert _blockops is not None
    available = 0 if escapes is None else escapes.numel()
    used = _blockops.unfuse_block(
        *_block_arguments(fused, left, right, out, codes, packed),
        _address(escapes if available else None),
        available,
    )
    return None if used < 0 else int(used)


def screens(weight: torch.Tensor, fused: torch.Tensor) -> bool:
    """Whether :func:`screen_block` does this bound check: built and switched on, a CPU
    float16 or bfloat16 merge with contiguous rows."""
    if _blockops is None or not _enabled or weight.dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.dtype == torch.float16 and not _blockops.has_float16():
        return False
    return (
        all(
            t.device.type == "cpu" and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)
            for t in (weight, fused)
        )
        and fused.dtype == weight.dtype
    )


@dataclass(frozen=True)
class ExactTerms:
    """What :func:`screen_block` needs to compute a candidate's ratio in float64 (the bound
    check's ``_Exact`` factors, for a block's rows): the reference is
    ``W + left[i] . right_t[j]``, the bound ``gamma |W| + alpha[i] . |right_t[j]| +
    underflow[j]`` plus the dtype's half ulp at ``|reference|`` plus that.

    Attributes:
        left: ``rows x rank`` float64, the coefficients folded in.
        right_t: ``cols x rank`` float64, ``right`` transposed.
        alpha: ``rows x rank`` float64 (rows may be strided): the bound's weights of
            ``|right|``.
        underflow: ``cols`` float64, the bound's per-column underflow term.
        gamma: the bound's ``gamma_n``, the weight's multiplier.
        dtype: the weight's dtype (whose half ulp the bound adds).
    """

    left: torch.Tensor
    right_t: torch.Tensor
    alpha: torch.Tensor
    underflow: torch.Tensor
    gamma: float
    dtype: torch.dtype


class Screened(NamedTuple):
    """:func:`screen_block`'s answer: how many candidates, the largest of their float64
    ratios (0.0 without ``exact``), and their flat indices (with ``room``; None when there
    were more than ``room``)."""

    candidates: int
    worst: float
    found: torch.Tensor | None


def screen_block(
    weight: torch.Tensor,
    fused: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    row_sums: torch.Tensor,
    row_weight: float,
    column_scale: torch.Tensor,
    floor: int,
    threshold: float,
    *,
    room: int | None = None,
    exact: ExactTerms | None = None,
) -> Screened:
    """The bound check's screen of a block (``safemerge.merge.bound_check._Screen``, whose
    docstring has the proof): every element whose screened ratio is not below
    ``threshold`` is a candidate; with ``room``, their flat indices are listed (at most
    ``room``), with ``exact``, their ratios are computed in float64 on the spot. Each
    row's factor ``a'_r`` is made from its float64 ``row_sums`` entry and ``row_weight``
    as ``_Screen._row_scale`` makes it, bit for bit.

    The screen's product is computed in the opposite order of the fuse's, so that the
    check does not repeat the fuse's arithmetic: a slip in either shows as a difference.
    """
    assert _blockops is not None
    rows, columns = weight.shape
    assert row_sums.shape == (rows,)
    found = None if room is None else torch.empty(max(room, 1), dtype=torch.int64)
    exact_arguments: tuple[int | float, ...] = (0, 0, 0, 0, 0, 0.0, 0.0, 0)
    if exact is not None:
        rank = left.shape[1]
        assert exact.left.shape == (rows, rank) and exact.alpha.shape == (rows, rank)
        assert exact.right_t.shape == (columns, rank) and exact.underflow.shape == (columns,)
        for factor in (exact.left, exact.right_t, exact.underflow, exact.alpha[:1]):
            assert factor.dtype == torch.float64 and factor.is_contiguous()
        exact_arguments = (
            exact.left.data_ptr(),
            exact.right_t.data_ptr(),
            exact.alpha.data_ptr(),
            exact.alpha.stride(0),
            exact.underflow.data_ptr(),
            exact.gamma,
            torch.finfo(exact.dtype).smallest_normal,
            MANTISSA_BITS[exact.dtype],
        )
    count, worst = _blockops.screen_block(
        _KINDS[weight.dtype],
        weight.data_ptr(),
        _row_stride(weight),
        fused.data_ptr(),
        _row_stride(fused),
        *_factors(left, right),
        rows,
        columns,
        _contiguous_float64(row_sums).data_ptr(),
        row_weight,
        _contiguous_float32(column_scale).data_ptr(),
        floor,
        threshold,
        _address(found),
        0 if room is None else room,
        *exact_arguments,
    )
    listed = None if found is None or count < 0 else found[:count]
    return Screened(int(count), float(worst), listed)


def lookup_4bit(
    blocks: torch.Tensor,
    reciprocal: torch.Tensor,
    scales: torch.Tensor,
    half_cells: float,
    midpoint: torch.Tensor,
    code: torch.Tensor,
    value: torch.Tensor,
    codes: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """The 4-bit quantizer's lookup (``safemerge.quant.quantize4._lookup`` with its scaling
    before it) in one compiled pass, to the same bits: for each row of ``blocks`` (float32,
    contiguous) and its ``reciprocal`` and ``scales``, the code indices into ``codes`` and
    ``code * scale`` into ``values``."""
    assert _blockops is not None
    count, blocksize = blocks.shape
    for tensor in (blocks, reciprocal, scales, midpoint, value, values):
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert code.dtype == codes.dtype == torch.uint8 and code.is_contiguous()
    assert codes.is_contiguous() and codes.numel() == values.numel() == blocks.numel()
    assert reciprocal.numel() == scales.numel() == count
    _blockops.lookup_4bit(
        blocks.data_ptr(),
        count,
        blocksize,
        reciprocal.data_ptr(),
        scales.data_ptr(),
        half_cells,
        midpoint.data_ptr(),
        code.data_ptr(),
        value.data_ptr(),
        codes.data_ptr(),
        values.data_ptr(),
    )


def _contiguous_float32(tensor: torch.Tensor) -> torch.Tensor:
    assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    return tensor


def _contiguous_float64(tensor: torch.Tensor) -> torch.Tensor:
    assert tensor.dtype == torch.float64 and tensor.is_contiguous()
    return tensor


def rank_product(
    left: torch.Tensor, right: torch.Tensor, out: torch.Tensor, term: torch.Tensor
) -> torch.Tensor:
    """``left @ right`` into ``out`` as the kernel computes it, with torch ops.

    ``left[:, 0] * right[0]``, then ``+ left[:, k] * right[k]`` for each further k, every
    product and sum rounded on its own: a fixed order of IEEE operations, so any machine
    gets the same bits (a BLAS matmul's order and fused multiply-adds vary with the
    library, the CPU and the thread count). ``term`` is scratch the size of ``out``.
    """
    torch.mul(left[:, :1], right[:1], out=out)
    for k in range(1, left.shape[1]):
        out.add_(torch.mul(left[:, k : k + 1], right[k : k + 1], out=term))
    return out


def _block_arguments(
    source: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    out: torch.Tensor,
    codes: torch.Tensor | None,
    packed: torch.Tensor | None,
) -> tuple[int, ...]:
    """The arguments ``fuse_block`` and ``unfuse_block`` share, in their order: the dtype's
    kind, the source block and its row stride, the factors, the shape, the output block
    and its row stride, the codes scratch and the packed codes (0 for none)."""
    rows, columns = source.shape
    return (
        _KINDS[source.dtype],
        source.data_ptr(),
        _row_stride(source),
        *_factors(left, right),
        rows,
        columns,
        out.data_ptr(),
        _row_stride(out),
        _address(codes),
        _address(packed),
    )


def _address(tensor: torch.Tensor | None) -> int:
    """A tensor's data address for the kernel; 0 (NULL) for none."""
    return 0 if tensor is None else tensor.data_ptr()


def _factors(left: torch.Tensor, right: torch.Tensor) -> tuple[int, int, int]:
    assert left.is_contiguous() and right.is_contiguous() and left.dtype == torch.float32
    assert right.dtype == torch.float32 and left.shape[1] == right.shape[0] >= 1
    return left.data_ptr(), right.data_ptr(), left.shape[1]


def _row_stride(block: torch.Tensor) -> int:
    assert block.stride(1) == 1 or block.shape[1] <= 1, "the kernel needs contiguous rows"
    return block.stride(0) if block.shape[0] > 1 else block.shape[1]
