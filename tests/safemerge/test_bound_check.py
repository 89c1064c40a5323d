"""The screened bound check: the same worst ratio as the plain float64 ``merge_bound``.

``worst_error_of_bound`` screens float16 and bfloat16 blocks in float32 and computes in
float64 only the elements the screen cannot rule out. These tests hold it to the plain
reference, ``max |fused - reference| / bound`` from :func:`safemerge.merge_bound`, on
random fuses and on adversarial ones (elements just inside and just outside their
bound, at a power of two, subnormal, huge, NaN or infinite, zero weights and factors),
with blocks small enough that most of them go through the screen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import event, given, note, target
from hypothesis import strategies as st

from safemerge.merge import bound_check, kernel
from safemerge.merge.bound_check import worst_error_of_bound
from safemerge.merge.bounds import Term, merge_bound
from safemerge.merge.numerics import from_ordered_bits, ordered_bits

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("correct", "inside", "outside", "power_of_two", "nan", "infinite", "far")


def reference_worst(
    original: torch.Tensor, fused: torch.Tensor, terms: list[Term], dtype: torch.dtype
) -> float:
    """The plain float64 check; NaN errors count as infinite."""
    reference, bound = merge_bound(original, terms, dtype)
    ratios = (fused.to(torch.float64) - reference).abs() / bound
    if bool(ratios.isnan().any()):
        return math.inf
    return float(ratios.max())


def correct_fuse(original: torch.Tensor, terms: list[Term], dtype: torch.dtype) -> torch.Tensor:
    """The float32 merge the bound models (coefficient folded into ``left``), cast."""
    merged = original.to(torch.float32)
    for left, right, coefficient in terms:
        merged = merged + (left.to(torch.float32) * coefficient) @ right.to(torch.float32)
    return merged.to(dtype)


def neighbour(value: float, dtype: torch.dtype, up: bool) -> float:
    """The ``dtype`` value next to ``value`` (itself a ``dtype`` value), up or down."""
    ordered = ordered_bits(torch.tensor([value], dtype=dtype))
    return float(from_ordered_bits(ordered + (1 if up else -1), dtype))


def grid_around(target_value: float, dtype: torch.dtype) -> tuple[float, float]:
    """The ``dtype`` values just below and just above ``target_value`` (float64)."""
    nearest = float(torch.tensor(target_value, dtype=torch.float64).to(dtype))
    if nearest > target_value:
        return neighbour(nearest, dtype, up=False), nearest
    if nearest < target_value:
        return nearest, neighbour(nearest, dtype, up=True)
    return neighbour(nearest, dtype, up=False), neighbour(nearest, dtype, up=True)


def place(
    kind: str,
    fused: torch.Tensor,
    reference: torch.Tensor,
    bound: torch.Tensor,
    index: tuple[int, int],
    dtype: torch.dtype,
) -> None:
    """Set ``fused[index]`` to the adversarial value ``kind`` names (in place)."""
    exact, allowed = float(reference[index]), float(bound[index])
    edge = exact + allowed if index[0] % 2 else exact - allowed
    below, above = grid_around(edge, dtype)
    outer = above if edge > exact else below
    # The grid value nearest the bound's edge from inside (the correct value if none is).
    inside = [v for v in (below, above) if abs(v - exact) <= allowed]
    inner = max(inside, key=lambda v: abs(v - exact), default=float(fused[index]))
    value = {
        "correct": float(fused[index]),
        "inside": inner,  # the last grid value within the bound
        "outside": outer,  # the first grid value past the bound
        "power_of_two": math.copysign(2.0 ** round(math.log2(abs(exact) or 1.0)), exact or 1.0),
        "nan": math.nan,
        "infinite": math.inf,
        "far": exact + 1e3 * allowed,
    }[kind]
    if kind in ("inside", "outside") and not math.isfinite(value):
        value = float(fused[index])
    fused[index] = value


@contextmanager
def small_blocks(screen_elements: int, batch: int, threads: int) -> Iterator[None]:
    """Blocks of a few rows, so that most blocks go through the screen."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with (
            mock.patch.object(bound_check, "SCREEN_ELEMENTS", screen_elements),
            mock.patch.object(bound_check, "BLOCK_ELEMENTS", screen_elements),
            mock.patch.object(bound_check, "GATHER_BATCH", batch),
            # A few rows' worth: the first blocks are seeded, the rest screened.
            mock.patch.object(bound_check, "SEED_ELEMENTS", max(1, screen_elements // 8)),
        ):
            yield
    finally:
        torch.set_num_threads(previous)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[Term], torch.dtype]:
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 48))
    columns = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    # Weight scale: ordinary, tiny (float32 and bfloat16 subnormals), near float16's top.
    scale = draw(st.sampled_from([1e-2, 1.0, 2.0**-130, 2.0**-20, 3e3, 0.0]))
    weight = (torch.randn(rows, columns, generator=generator) * scale).to(dtype)
    terms: list[Term] = []
    for _ in range(draw(st.integers(1, 2))):
        rank = draw(st.integers(1, 4))
        factor_scale = draw(st.sampled_from([1e-2, 0.3, 2.0**-70, 0.0]))
        factor_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
        left = (torch.randn(rows, rank, generator=generator) * factor_scale).to(factor_dtype)
        right = (torch.randn(rank, columns, generator=generator) * factor_scale).to(factor_dtype)
        coefficient = draw(st.sampled_from([1.0, 2.0, -1 / 3, 1e-40, 5e3]))
        terms.append((left, right, coefficient))
    fused = correct_fuse(weight, terms, dtype)
    reference, bound = merge_bound(weight, terms, dtype)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(KINDS))
        index = (draw(st.integers(0, rows - 1)), draw(st.integers(0, columns - 1)))
        place(kind, fused, reference, bound, index, dtype)
        event(f"placed {kind}")
    event(f"dtype {dtype}")
    return weight, fused, terms, dtype


def screen_path(path: str) -> AbstractContextManager[None]:
    """The screen in the compiled kernel (where built), or in torch ops."""
    if path == "compiled" and not kernel.compiled():
        pytest.skip("the compiled kernel is not built here")
    return kernel.disabled() if path == "torch ops" else nullcontext()


SCREEN_PATHS = pytest.mark.parametrize("path", ["compiled", "torch ops"])


@SCREEN_PATHS
@given(cases(), st.sampled_from([64, 256]), st.sampled_from([1, 37]), st.sampled_from([1, 2]))
def test_the_worst_ratio_is_merge_bound_s(
    path: str,
    case: tuple[torch.Tensor, torch.Tensor, list[Term], torch.dtype],
    screen_elements: int,
    batch: int,
    threads: int,
) -> None:
    weight, fused, terms, dtype = case
    expected = reference_worst(weight, fused, terms, dtype)
    with small_blocks(screen_elements, batch, threads), screen_path(path):
        worst = worst_error_of_bound(weight, fused, terms, dtype)
    note(f"expected {expected!r}, got {worst!r}")
    if math.isfinite(expected):
        target(min(expected, 4.0), label="worst ratio")  # push toward elements near the bound
        event("over the bound" if expected > 1 else "within the bound")
    assert worst == pytest.approx(expected, rel=2**-30, abs=2**-30)
    if abs(expected - 1) > 2**-30:
        assert (worst <= 1) == (expected <= 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["inside", "outside"])
def test_the_adversarial_elements_straddle_their_bound(dtype: torch.dtype, kind: str) -> None:
    """``place`` really puts elements on either side of their bound, deep in the matrix."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(64, 48, generator=generator) * 0.05).to(dtype)
    terms: list[Term] = [
        (torch.randn(64, 4, generator=generator), torch.randn(4, 48, generator=generator), 0.5)
    ]
    fused = correct_fuse(weight, terms, dtype)
    reference, bound = merge_bound(weight, terms, dtype)
    spots = [(61, 7), (40, 47), (33, 0)]
    for spot in spots:
        place(kind, fused, reference, bound, spot, dtype)
    ratios = (fused.to(torch.float64) - reference).abs() / bound
    placed = torch.stack([ratios[spot] for spot in spots])
    if kind == "outside":
        assert bool((placed > 1).all())
    else:
        assert bool((placed <= 1).all())
        for spot in spots:  # the last grid value inside: one step further is outside
            value, exact = float(fused[spot]), float(reference[spot])
            further = neighbour(value, dtype, up=spot[0] % 2 == 1)
            assert abs(further - exact) > float(bound[spot])
    expected = reference_worst(weight, fused, terms, dtype)
    with small_blocks(96, 5, 1):
        assert worst_error_of_bound(weight, fused, terms, dtype) == pytest.approx(
            expected, rel=2**-30
        )


@SCREEN_PATHS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_screen_never_drops_an_element_that_may_reach_the_worst(
    dtype: torch.dtype, path: str
) -> None:
    """Every element whose exact ratio reaches ``worst`` is a candidate, for any ``worst``."""
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(32, 256, generator=generator) * 0.02).to(dtype)
    weight[0, :8] = torch.tensor([0.0, 2.0**-14, 2.0**-20, 1.0, -2.0, 6e4, 2.0**-126, 1e-30])
    terms: list[Term] = [
        (
            torch.randn(32, 8, generator=generator) * 0.01,
            torch.randn(8, 256, generator=generator) * 0.01,
            2.0,
        )
    ]
    fused = correct_fuse(weight, terms, dtype)
    reference, bound = merge_bound(weight, terms, dtype)
    ratios = ((fused.to(torch.float64) - reference).abs() / bound).view(-1)
    screen = bound_check._Screen(terms, dtype)
    for worst in [0.5, 0.9, float(ratios.kthvalue(ratios.numel() - 20).values), 0.99]:
        with screen_path(path):
            candidates = screen.candidates(weight, fused, 0, 32, worst)
        if candidates is None:
            continue
        needed = set((ratios >= worst).nonzero().view(-1).tolist())
        assert needed <= set(candidates.tolist())


@SCREEN_PATHS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_screen_keeps_every_element_at_the_worst_where_y_s_error_fills_the_bound(
    dtype: torch.dtype, path: str
) -> None:
    """The screen's test ``x + w a < t h`` weighs the accumulated error ``a`` by only ``w =
    1 - t``: sound because the bound holds ``acc`` in its denominator too, and tight where
    the float32 merge ``Y`` is as far from the reference as the bound allows. Here it is:
    a coefficient of ``1.5 * 2**-149`` rounds to ``2**-148`` in float32, a third off, and the
    bound's ``|c - c32| P`` term is exactly that error (rank 1, dyadic factors: no other
    rounding). One row is made of such elements, fused correctly (each is ``Y``, a grid
    value), so each one's ratio is ``1 - (half ulp) / acc``; screened against each ratio
    as ``worst``, every element reaching it must stay a candidate. A screen weighing
    ``a`` by ``0.9 w`` already drops some of them."""
    rows, columns, row = 32, 64, 5
    generator = torch.Generator().manual_seed(11)
    left = torch.zeros(rows, 1)
    left[row] = 3 * 2.0**120  # right kept small: the zero rows' q has a 2**-149 b_c part
    right = torch.randint(1, 8, (1, columns), generator=generator) * 2.0**12
    terms: list[Term] = [(left, right, 1.5 * 2.0**-149)]
    weight = torch.zeros(rows, columns, dtype=dtype)  # the other rows: 0, exactly right
    fused = correct_fuse(weight, terms, dtype)
    reference, bound = merge_bound(weight, terms, dtype)
    y_error = (fused[row].to(torch.float64) - reference[row]).abs()  # fused[row] is Y
    assert bool((y_error > bound[row] * 0.98).all())  # Y's error fills its bound
    ratios = ((fused.to(torch.float64) - reference).abs() / bound).view(-1)
    screen = bound_check._Screen(terms, dtype)
    screened = 0
    for worst in sorted(set(ratios[row * columns : (row + 1) * columns].tolist())):
        with screen_path(path):
            candidates = screen.candidates(weight, fused, 0, rows, worst)
        assert candidates is not None  # one row in 32: few enough to list
        needed = set((ratios >= worst).nonzero().view(-1).tolist())
        assert needed <= set(candidates.tolist()), f"worst {worst}"
        screened += 1
    assert screened >= 4  # the distinct ratios of the row


@SCREEN_PATHS
def test_a_correct_bfloat16_fuse_is_mostly_settled_by_the_screen(path: str) -> None:
    """The point of the screen: few elements computed in float64, the same answer."""
    generator = torch.Generator().manual_seed(7)
    rows, columns = 512, 1024
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(torch.bfloat16)
    terms: list[Term] = [
        (
            torch.randn(rows, 16, generator=generator) * 0.01,
            torch.randn(16, columns, generator=generator) * 0.01,
            2.0,
        )
    ]
    fused = correct_fuse(weight, terms, torch.bfloat16)
    fused[500, 1000] = fused[500, 1000].float() * (1 + 2**-6)  # a wrong element, late
    exact_elements = 0
    original_elements = bound_check._Exact.elements
    original_block = bound_check._Exact.block

    def counted_elements(self: bound_check._Exact, *args: torch.Tensor) -> float:
        nonlocal exact_elements
        exact_elements += args[2].numel()
        return original_elements(self, *args)

    def counted_block(
        self: bound_check._Exact, original: torch.Tensor, f: torch.Tensor, start: int, stop: int
    ) -> float:
        nonlocal exact_elements
        exact_elements += (stop - start) * columns
        return original_block(self, original, f, start, stop)

    original_screen = kernel.screen_block
    in_kernel = 0

    def counted_screen(*args: Any, **kwargs: Any) -> kernel.Screened:
        nonlocal exact_elements, in_kernel
        screened = original_screen(*args, **kwargs)
        if kwargs.get("exact") is not None:  # the kernel computed its candidates' ratios
            exact_elements += screened.candidates
            in_kernel += screened.candidates
        return screened

    with (
        mock.patch.object(bound_check._Exact, "elements", counted_elements),
        mock.patch.object(bound_check._Exact, "block", counted_block),
        mock.patch.object(kernel, "screen_block", counted_screen),
        small_blocks(1 << 14, 1 << 10, 1),
        screen_path(path),
    ):
        worst = worst_error_of_bound(weight, fused, terms, torch.bfloat16)
    assert worst == pytest.approx(reference_worst(weight, fused, terms, torch.bfloat16), rel=2**-30)
    assert worst > 1
    assert exact_elements < rows * columns / 8
    # On the compiled path the kernel computes the candidates, the wrong element among them.
    assert (in_kernel > 0) == (path == "compiled")


def test_the_screen_stands_aside_where_its_proof_does_not_hold() -> None:
    weight = torch.randn(4, 4).to(torch.bfloat16)
    float64_terms: list[Term] = [(torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 4), 1.0)]
    float32_terms: list[Term] = [(torch.randn(4, 2), torch.randn(2, 4), 1.0)]
    applies = bound_check._Screen.applies
    assert applies(weight, weight, float32_terms, torch.bfloat16)
    assert not applies(weight, weight, float64_terms, torch.bfloat16)  # not float32-exact
    assert not applies(weight.float(), weight.float(), float32_terms, torch.float32)
    torch.set_float32_matmul_precision("medium")
    try:
        assert not applies(weight, weight, float32_terms, torch.bfloat16)
    finally:
        torch.set_float32_matmul_precision("highest")


def test_float32_below_rounds_down() -> None:
    below = bound_check._float32_below
    assert below(1.0) == 1.0
    assert below(1 + 2.0**-30) == 1.0
    assert below(1 - 2.0**-30) == 1 - 2.0**-24
    assert below(2.0**-160) == 0.0
    assert below(-1.0) == 0.0 and below(math.nan) == 0.0
    assert below(math.inf) == math.inf and below(1e300) == float(torch.finfo(torch.float32).max)
    for value in torch.rand(200, dtype=torch.float64).tolist():
        rounded = below(value)
        assert rounded <= value and float(torch.tensor(rounded, dtype=torch.float32)) == rounded


def test_an_empty_weight_has_no_error() -> None:
    empty = torch.empty(0, 8, dtype=torch.bfloat16)
    terms: list[Term] = [(torch.empty(0, 2), torch.randn(2, 8), 1.0)]
    assert worst_error_of_bound(empty, empty, terms, torch.bfloat16) == 0.0
