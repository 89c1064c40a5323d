"""The compiled block kernel computes exactly what the engine's torch ops compute.

Every case runs :func:`safemerge.merge.engine.fuse_matrix` and ``unfuse_matrix`` twice,
once on each path, and compares every bit: the fused weight, the correction (codes,
escapes, block layout), the exact and the arithmetic unfuse, and refusals with their
counts. The cases are drawn to reach what is hard for the kernel: rows whose packed codes
share a byte with the next row's, strided rows, ragged last blocks, escapes (elements two
or more steps from their original after the round trip), overflow at the guard, NaN and
Inf in the weight, subnormals; :func:`test_the_cases_reach_every_hard_spot` shows that
the strategy generates each of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, find, given, settings
from hypothesis import strategies as st

from safemerge.errors import NonFiniteMergeError
from safemerge.merge import engine, kernel
from safemerge.merge.correction import Correction
from safemerge.merge.numerics import int_view

pytestmark = pytest.mark.skipif(not kernel.compiled(), reason="the compiled kernel is not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Case:
    weight: torch.Tensor  # may be a strided view (a column slice of a wider tensor)
    left: torch.Tensor
    right: torch.Tensor

    @property
    def delta(self) -> engine.LowRankDelta:
        return engine.LowRankDelta.from_terms([(self.left, self.right, 1.0)], torch.device("cpu"))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 70))
    columns = draw(st.integers(1, 13))  # odd widths: a byte of codes spans two rows
    rank = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    weight_scale = draw(st.sampled_from([1e-40, 1e-6, 1.0, 1e4]))
    delta_scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3, 1e19]))
    padding = draw(st.integers(0, 3))  # extra columns: the rows are strided
    wide = torch.randn(rows, columns + padding, generator=generator) * weight_scale
    weight = wide.to(dtype)[:, :columns]
    if draw(st.booleans()):  # a planted non-finite weight element
        weight[draw(st.integers(0, rows - 1)), draw(st.integers(0, columns - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")])
        )
    left = torch.randn(rows, rank, generator=generator) * delta_scale
    right = torch.randn(rank, columns, generator=generator)
    return Case(weight, left, right)


@contextlib.contextmanager
def small_blocks() -> Iterator[None]:
    """Blocks of a few rows, so that a case has several, and a ragged last one."""
    saved = engine.BLOCK_BYTES
    engine.BLOCK_BYTES = 4 * 13 * 4
    try:
        yield
    finally:
        engine.BLOCK_BYTES = saved


def run_fuse(case: Case, *, keep: bool, in_place: bool) -> dict[str, object]:
    """Fuse then unfuse exactly and arithmetically; every result's bits, or the refusal."""
    matrix = case.weight.clone() if in_place else case.weight
    try:
        fused = engine.fuse_matrix(
            matrix,
            case.delta,
            layer="x",
            weight_shape=matrix.shape,
            keep_correction=keep,
            in_place=in_place and keep,
        )
    except NonFiniteMergeError as error:
        return {"refused": str(error), "untouched": bits(matrix).equal(bits(case.weight))}
    merged = matrix if fused.merged is None else fused.merged
    out: dict[str, object] = {"fused": bits(merged), "block_rows": fused.block_rows}
    if fused.correction is not None:
        out.update(correction_parts(fused.correction))
        exact = engine.unfuse_matrix(
            merged.clone(),
            case.delta,
            layer="x",
            weight_shape=merged.shape,
            block_rows=fused.block_rows,
            correction=fused.correction,
        )
        assert exact is not None
        out["exact"] = bits(exact)
    try:
        arithmetic = engine.unfuse_matrix(
            merged, case.delta, layer="x", weight_shape=merged.shape, block_rows=fused.block_rows
        )
        assert arithmetic is not None
        out["arithmetic"] = bits(arithmetic)
    except NonFiniteMergeError as error:
        out["arithmetic"] = str(error)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    copied: torch.Tensor = int_view(tensor.contiguous()).clone()
    return copied


def tensor(result: dict[str, object], key: str) -> torch.Tensor:
    value = result[key]
    assert isinstance(value, torch.Tensor), f"{key}: {value}"
    return value


def correction_parts(correction: Correction) -> dict[str, object]:
    return {
        "codes": correction.packed_codes,
        "escapes": correction.escape_bits,
        "offsets": correction.block_offsets,
        "escape_starts": correction.block_escape_starts,
    }


def assert_same(compiled: dict[str, object], eager: dict[str, object]) -> None:
    assert compiled.keys() == eager.keys()
    for key, value in compiled.items():
        other = eager[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and value.equal(other), key
        else:
            assert value == other, key


def describe(case: Case, result: dict[str, object]) -> list[str]:
    """What hard spots a case reached (for the events and for the reachability test)."""
    spots = []
    if "refused" in result:
        spots.append("refused")
    escapes = result.get("escapes")
    if isinstance(escapes, torch.Tensor) and escapes.numel():
        spots.append("escapes")
    if case.weight.shape[1] % 4 and case.weight.shape[0] > 1:
        spots.append("codes straddle rows")
    if not case.weight.is_contiguous():
        spots.append("strided rows")
    if case.weight.shape[0] % 4:
        spots.append("ragged last block")
    return spots


@settings(deadline=None, max_examples=200)
@given(case=cases(), keep=st.booleans(), in_place=st.booleans(), threads=st.sampled_from([1, 2]))
def test_the_kernel_matches_the_torch_ops_bit_for_bit(
    case: Case, keep: bool, in_place: bool, threads: int
) -> None:
    with small_blocks(), engine.pinned_threads(threads):
        compiled = run_fuse(case, keep=keep, in_place=in_place)
        with kernel.disabled():
            eager = run_fuse(case, keep=keep, in_place=in_place)
    for spot in describe(case, compiled):
        event(spot)
    assert_same(compiled, eager)
    if "refused" in compiled:
        assert compiled["untouched"], "a refused in-place fuse changed the weight"
    elif "exact" in compiled:
        assert tensor(compiled, "exact").equal(bits(case.weight))


@pytest.mark.parametrize(
    "spot",
    [
        "refused",
        "escapes",
        "codes straddle rows",
        "strided rows",
        "ragged last block",
    ],
)
def test_the_cases_reach_every_hard_spot(spot: str) -> None:
    def reaches(case: Case) -> bool:
        with small_blocks():
            return spot in describe(case, run_fuse(case, keep=True, in_place=False))

    find(cases(), reaches, settings=settings(max_examples=2000, database=None, deadline=None))


def test_an_arithmetic_unfuse_that_overflows_is_refused_on_both_paths() -> None:
    """Too rare for random draws, so built: float16 65504 - 16368 = 49136 is a tie between
    49120 and 49152 and rounds to the even 49152; adding 16368 back gives 65520, float16's
    overflow threshold, so the arithmetic unfuse of a finite fuse is Inf."""
    case = Case(
        torch.tensor([[65504.0, 1.0]], dtype=torch.float16),
        torch.ones(1, 1),
        torch.tensor([[-16368.0, 0.0]]),
    )
    compiled = run_fuse(case, keep=True, in_place=False)
    with kernel.disabled():
        eager = run_fuse(case, keep=True, in_place=False)
    assert_same(compiled, eager)
    assert "overflow" in str(compiled["arithmetic"]) or "Inf" in str(compiled["arithmetic"])
    assert tensor(compiled, "exact").equal(bits(case.weight))


@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_change_a_bit(dtype: torch.dtype) -> None:
    """Blocks run on any thread, their matmul single-threaded: the same bits for any count."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(301, 257, generator=generator).to(dtype)
    left, right = (
        torch.randn(301, 16, generator=generator),
        torch.randn(16, 257, generator=generator),
    )
    case = Case(weight, left * 0.01, right)
    with small_blocks():
        results = []
        for threads in (1, 2, 3):
            with engine.pinned_threads(threads):
                results.append(run_fuse(case, keep=True, in_place=True))
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])


def test_a_correction_with_missing_escapes_is_refused_not_misapplied() -> None:
    """A block's codes and its kept escapes must agree; the kernel says so when they do not."""
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(64, 64, generator=generator) * 1e-3).to(torch.bfloat16)
    case = Case(
        weight, torch.randn(64, 4, generator=generator), torch.randn(4, 64, generator=generator)
    )
    fused = engine.fuse_matrix(weight, case.delta, layer="x", weight_shape=weight.shape)
    correction = fused.correction
    assert correction is not None and correction.escape_count > 0
    damaged = dataclasses.replace(correction, escape_bits=correction.escape_bits[:-1])
    assert fused.merged is not None
    with pytest.raises(ValueError, match="escapes but the correction kept"):
        engine.unfuse_matrix(
            fused.merged,
            case.delta,
            layer="x",
            weight_shape=weight.shape,
            block_rows=fused.block_rows,
            correction=damaged,
        )
