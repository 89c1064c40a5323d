"""Checking a fused layer against its error bound, every element, in bounded memory.

:func:`safemerge.merge_bound` gives the exact merge and its bound in float64, with
float64 temporaries the size of the weight: for a 14336 x 4096 projection that is
several GB, far more than the bfloat16 weight. Each element's reference and bound
depend only on its own row of ``M`` and of ``left`` (and all of ``right``), so
:func:`block_bound` evaluates the same bound row block by row block, rearranged to cost
less: one matmul gives every term's ``|left| @ |right|`` (the ``gamma_n`` and the
coefficients' float32 rounding folded into ``|left|``), and the final cast's half ulp
comes from the float64 exponent bits (exact, where ``log2`` can round a value just
below a power of two up to it). The tests hold it to :func:`safemerge.merge_bound`.

:func:`worst_error_of_bound` needs only the largest ratio, so for float16 and bfloat16
weights it first screens each block in float32 (:class:`_Screen`): a few cheap passes
give every element a proven upper bound on its ratio, and only the elements whose upper
bound reaches the largest exact ratio found so far are computed in float64
(:class:`_Exact`). Every element is still compared with its bound; the screen only
proves, for the others, that they cannot change the answer. See docs/design.md, "The
bound check".

Its blocks are small (to stay in cache) and many: torch runs each op on one thread, and
each of torch's intra-op threads takes the next block when done with one, as the
engine's blocks do. A parallel region per block waited for its slowest thread every time:
with two threads on two busy cores, that measured 40x slower than one thread.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Callable, Sequence

import torch

from safemerge.merge import bounds, engine, kernel
from safemerge.merge.numerics import FLOAT32_TINY_SUBNORMAL, MANTISSA_BITS, U32

#: Elements of float64 work per block: 512 KiB per temporary, so a block's handful of
#: temporaries stays near the caches (measured 2x faster than 2 MiB on a 2-core EPYC).
BLOCK_ELEMENTS = 1 << 16

#: Elements per screened block (float32: 512 KiB per temporary; measured faster than 2**16).
SCREEN_ELEMENTS = 1 << 17

#: Elements per screened block on the compiled path, where four blocks a thread allow: the
#: kernel needs no temporaries, and each block costs tens of microseconds of Python around
#: it (a 5632 x 2048 bfloat16 check measured 15% faster than with ``SCREEN_ELEMENTS``).
KERNEL_SCREEN_ELEMENTS = 1 << 19

#: A screened block with more candidates than this fraction of its elements is computed
#: whole in float64.
GATHER_FRACTION = 1 / 16

#: Elements computed in float64 first where no exact ratio is known yet (each thread's
#: first block), to give the screen one: the block's first rows, at least one.
SEED_ELEMENTS = 1 << 12

#: Candidates evaluated together in float64.
GATHER_BATCH = 1 << 14

_FLOAT64_MANTISSA_BITS = 52
_FLOAT64_EXPONENT_BIAS = 1023
_FLOAT32_EXPONENT_MASK = 0x7F800000
#: The screen's largest ``p``, 2**126: its inverse is still a normal float32.
_LARGEST_POWER = 0x7E800000
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_SCREENED_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT32_EXACT = (torch.float32, torch.float16, torch.bfloat16)
#: Elements per chunk whose maximum the screen compares first.
_CHUNK = 32

#: What float64 rounding can move a ratio, generously: the old check's float64 reference
#: is within ``(rank + 2) 2**-53 (|W| + sum |c| P)`` of the exact merge and every bound is
#: at least ``gamma_n (|W| + sum |c32| P)``, about ``2**29`` times that; 2**-16 also
#: covers a coefficient far from float32's range, where the ratio is a ratio of exact
#: parts.
_FLOAT64_NOISE = 2.0**-16


def worst_error_of_bound(
    original: torch.Tensor,
    fused: torch.Tensor,
    terms: Sequence[bounds.Term],
    dtype: torch.dtype,
) -> float:
    """``max |fused - exact| / bound`` over every element of a plain (non-DoRA) merge.

    Args:
        original: the weight before the fuse, as the matrix ``M`` (rows x columns).
        fused: the weight after the fuse, in the same layout.
        terms: ``(left, right, coefficient)`` per adapter, in ``M``'s layout.
        dtype: the weight's dtype (the final cast's).

    Returns:
        The worst ratio: at most 1 for a correct fuse; ``inf`` where an element's error
        is NaN (a NaN fused element, say).
    """
    rows, columns = original.shape
    if rows * columns == 0:
        return 0.0
    # As the engine's blocks: each thread takes the next block when done with one (no
    # parallel region waits for a slow thread), torch runs one thread per op meanwhile.
    threads = engine.block_threads() if original.device.type == "cpu" else 1
    with engine.pinned_threads(1):
        screened = _Screen.applies(original, fused, terms, dtype)
        compiled = screened and kernel.screens(original, fused)
        exact = _Exact(terms, dtype, compiled=compiled)
        if not screened:
            step = max(1, BLOCK_ELEMENTS // columns)
            return _Blocks(rows, step, threads).run(
                lambda start, stop, worst: exact.block(original, fused, start, stop)
            )
        step = max(1, SCREEN_ELEMENTS // columns)
        if compiled:
            shared = -(-rows // (4 * threads))
            step = max(step, min(KERNEL_SCREEN_ELEMENTS // columns, shared))
        screen = _Screen(terms, dtype)
        return _Blocks(rows, step, threads).run(
            lambda start, stop, worst: screen.checked(exact, original, fused, start, stop, worst),
            flush=lambda: screen.flush(exact, original, fused),
        )


class _Blocks:
    """Row blocks shared out to threads, and the largest ratio found so far."""

    def __init__(self, rows: int, step: int, threads: int) -> None:
        self._ranges = iter([(start, min(start + step, rows)) for start in range(0, rows, step)])
        self._threads = max(1, min(threads, -(-rows // step)))
        self._lock = threading.Lock()
        self._worst = 0.0
        self._stop = False

    def run(
        self,
        check: Callable[[int, int, float], float],
        flush: Callable[[], float] | None = None,
    ) -> float:
        """``check(start, stop, worst)`` gives a block's largest ratio (or one at most the
        ``worst`` it was given); ``flush`` each thread's last, when no blocks are left."""

        def work() -> None:
            try:
                while True:
                    with self._lock:
                        block = None if self._stop else next(self._ranges, None)
                        worst = self._worst
                    if block is None:
                        break
                    self._found(check(*block, worst))
                if flush is not None:
                    self._found(flush())
            except BaseException:
                self._stop = True  # the other threads stop after their current block
                raise

        engine.on_threads(work, self._threads)
        return self._worst

    def _found(self, ratio: float) -> None:
        with self._lock:
            self._worst = max(self._worst, ratio)


class _Exact:
    """The float64 ratio ``|fused - reference| / bound``, as :func:`block_bound` has it.

    The layer's factors are laid out once: ``left`` with each coefficient folded in for
    the reference, and the bound's ``[alpha | 1] @ [|right|; underflow]``, with ``alpha``
    ``|left|`` times ``gamma |c32| + |c - c32|`` and ``underflow`` the per-column
    ``2**-150 colsum |right| + n 2**-149``, so one matmul gives the bound but for
    ``gamma |W|`` and the cast's half ulp. The sums run in another order than
    :func:`block_bound`'s: the ratios agree up to float64 rounding.
    """

    def __init__(
        self, terms: Sequence[bounds.Term], dtype: torch.dtype, *, compiled: bool = False
    ) -> None:
        """``compiled``: lay out only what :func:`kernel.screen_block` takes (``left``,
        ``right_t``, ``alpha``, ``underflow``), for a check the compiled screen makes whole;
        the torch ops' layouts take a few milliseconds a layer more."""
        n = bounds.roundings([left.shape[1] for left, _, _ in terms])
        self.gamma = bounds.gamma(n)
        self.dtype = dtype
        lefts, alphas, rights = [], [], []
        for left, right, coefficient in terms:
            rounded = float(torch.tensor(coefficient, dtype=torch.float32))
            left64 = left.to(torch.float64)
            lefts.append(left64 * coefficient)
            alphas.append(left64.abs().mul_(self.gamma * abs(rounded) + abs(coefficient - rounded)))
            rights.append(right.to(torch.float64))
        right = _joined(rights, dim=0)
        right_abs = right.abs()
        self.underflow = (
            right_abs.sum(dim=0).mul_(FLOAT32_TINY_SUBNORMAL / 2).add_(n * FLOAT32_TINY_SUBNORMAL)
        )
        self.left = _joined(lefts, dim=1)
        self.alpha = _joined(alphas, dim=1)
        # Column-major: a candidate's column is contiguous.
        self.right_t = right.T.contiguous()
        if compiled:
            return
        self.right = right
        ones = torch.ones(self.left.shape[0], 1, dtype=torch.float64, device=right.device)
        self.bound_left = torch.cat([self.alpha, ones], dim=1)
        self.bound_right = torch.cat([right_abs, self.underflow[None]], dim=0)
        self.bound_right_t = self.bound_right.T.contiguous()

    def kernel_terms(self, start: int, stop: int) -> kernel.ExactTerms:
        """These factors for rows ``start:stop``, as :func:`kernel.screen_block` takes them."""
        return kernel.ExactTerms(
            self.left[start:stop],
            self.right_t,
            self.alpha[start:stop],
            self.underflow,
            self.gamma,
            self.dtype,
        )

    def rows(self, original: torch.Tensor, fused: torch.Tensor, start: int, stop: int) -> float:
        """The largest ratio over rows ``start:stop``, block by block."""
        step = max(1, BLOCK_ELEMENTS // original.shape[1])
        return max(
            self.block(original, fused, row, min(row + step, stop))
            for row in range(start, stop, step)
        )

    def block(self, original: torch.Tensor, fused: torch.Tensor, start: int, stop: int) -> float:
        """The largest ratio over rows ``start:stop`` (float64 temporaries that size)."""
        weight, result = original[start:stop], _readable(fused[start:stop])
        # error = W - F + c L @ R  (= reference - fused), one matmul.
        error = weight.to(torch.float64, copy=True).sub_(result)
        error.addmm_(self.left[start:stop], self.right)
        bound = weight.to(torch.float64, copy=True).abs_()
        bound.addmm_(self.bound_left[start:stop], self.bound_right, beta=self.gamma)
        if self.dtype != torch.float32:
            magnitude = torch.add(error, result).abs_().add_(bound)  # |reference| + acc
            bound += _half_ulp(magnitude, self.dtype)
        return _largest(error.abs_().div_(bound))

    def elements(self, original: torch.Tensor, fused: torch.Tensor, flat: torch.Tensor) -> float:
        """The largest ratio over the elements at row-major indices ``flat``."""
        columns = original.shape[1]
        rows, cols = flat.div(columns, rounding_mode="floor"), flat % columns
        weight = torch.take(original, flat).to(torch.float64)
        reference = weight + (self.left[rows] * self.right_t[cols]).sum(dim=1)
        products = (self.bound_left[rows] * self.bound_right_t[cols]).sum(dim=1)
        bound = weight.abs().mul_(self.gamma).add_(products)
        if self.dtype != torch.float32:
            bound += _half_ulp(reference.abs().add_(bound), self.dtype)
        error = torch.take(fused, flat).to(torch.float64).sub_(reference).abs_()
        return _largest(error.div_(bound))


def _joined(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The tensors side by side along ``dim``, contiguous (a single one copied only if not)."""
    return tensors[0].contiguous() if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _readable(block: torch.Tensor) -> torch.Tensor:
    # torch does no mixed-dtype arithmetic with float8: read it into float64 first.
    if block.dtype in _FLOAT32_EXACT:
        return block
    return block.to(torch.float64)


def _largest(ratios: torch.Tensor) -> float:
    """The largest ratio; ``inf`` if any is NaN (``torch.max`` propagates NaN)."""
    if not ratios.numel():
        return 0.0
    largest = float(ratios.max())
    return math.inf if math.isnan(largest) else largest


class _Screen:
    """A float32 upper bound on every element's ratio, for float16 and bfloat16 weights.

    For each element the screen computes ``Y``, the float32 merge exactly as the bound
    models the engine's (``c32`` folded into ``left`` with one rounding, a float32 matmul,
    ``+ W`` rounded once), so ``|Y - reference| <= acc``, ``acc`` being the bound's own
    accumulated part (``docs/design.md``, "Forward error bounds"); with ``x = |F - Y|``
    and any ``h <= half_ulp_dtype(|Y|)`` (of ``max(|Y|, smallest normal)``):

        |F - reference| <= x + acc                 (triangle inequality)
        bound = acc + half_ulp(|reference| + acc) >= acc + h
                                                  (|Y| <= |reference| + acc, monotone)
        ratio <= (x + acc) / (acc + h)

    so ``ratio < t`` as soon as ``x + (1 - t) acc < t h``. Where ``t <= 1`` and ``a >= acc``
    that follows from ``x + (1 - t) a < t h``; where ``t > 1``, from ``x < t h`` (then
    ``(1 - t) acc <= 0``): in both cases from ``x + w a < t h`` with ``w = max(1 - t, 0)``.
    A correct fuse's worst ratio is just below 1, so ``w`` is small and ``acc`` barely
    counts: only the elements that round nearly half an ulp away stay candidates.

    ``acc`` is bounded per element without a second matmul: ``|W| <= |Y| / (1 - u) +
    |fl(Lf @ R)|`` and every ``P_i[r, c] <= (sum_k |left_i[r, k]|) max_k |right[k, c]|``,
    so ``acc <= a = gamma |Y| / (1 - u) + a_r b_c + (n + 1) 2**-149`` with ``a_r`` per row
    (``__init__``) and ``b_c = max_k |right[k, c]|``. ``p`` is ``Y``'s float32 exponent
    bits, clamped at the smallest normal and at ``2**126``, and ``h = 2**-(m+1) p`` (``m``
    the dtype's mantissa bits): the half ulp of ``Y``'s binade, or less where ``|Y| >=
    2**127`` (bfloat16 only), whose ``p`` the clamp keeps below it so that ``1 / p`` is a
    normal float32. So ``|Y| < 4p``, ``h >= h_min`` (at the smallest normal), and:

        (x + w a) / h <= 2**(m+1) (x + w a_r b_c) / p  +  w slack,
        slack  = gamma 2**(m+3) / (1 - u) + (n + 1) 2**-149 / h_min

    The screen is ``q = fl(fl(|fl(Y - F)|) + fl(a'_r b_c)) / p``, ``a'_r >= w a_r`` in float32
    (:meth:`_row_scale`): a subtraction, an absolute value, a multiply-add and an exact
    division by a power of two. Each float32 rounding is relative (at most ``u``) or,
    where the result is subnormal, absolute (at most ``2**-150``; a subnormal sum or
    difference is exact), so the exact ``(x + a'_r b_c) / p <= (1 + 2u)**2 (q + tiny)``
    (:meth:`threshold`). An element with ``q`` below the threshold then has a ratio, even
    as float64 computes it, below ``worst``, a ratio already found exactly: it cannot be
    the largest. The rest (NaN included: the test is ``not q < threshold``) are computed
    exactly.

    It relies on IEEE float32 arithmetic with subnormals in the matmul and elementwise
    ops: :meth:`applies` checks the matmul precision setting and probes both.
    """

    def __init__(self, terms: Sequence[bounds.Term], dtype: torch.dtype) -> None:
        n = bounds.roundings([left.shape[1] for left, _, _ in terms])
        gamma = bounds.gamma(n)
        rank = sum(left.shape[1] for left, _, _ in terms)
        lefts, rights = [], []
        row_sums = torch.zeros(terms[0][0].shape[0], dtype=torch.float64)
        for left, right, coefficient in terms:
            rounded = float(torch.tensor(coefficient, dtype=torch.float32))
            folded = left.to(torch.float32) * rounded  # one float32 rounding, as the engine
            lefts.append(folded)
            rights.append(right.to(torch.float32))
            weight = gamma * abs(rounded) + abs(coefficient - rounded)
            # gamma (1 + gamma_r) |fl(c32 left)| (the |W| part) + alpha (the P_i part).
            row_sums += folded.to(torch.float64).abs().sum(dim=1) * (gamma * (1 + gamma))
            row_sums += left.to(torch.float64).abs().sum(dim=1) * weight
        self.left = torch.cat(lefts, dim=1)  # fl32(c32 * left), the terms side by side
        self.right = torch.cat(rights, dim=0)  # exactly the terms' values
        self.column_scale = self.right.abs().amax(dim=0, keepdim=True)  # b_c, exact
        # a_r: + r 2**-150 (the fold's underflow, and colsum |right| <= r b_c).
        self._row_sums = row_sums + rank * FLOAT32_TINY_SUBNORMAL
        mantissa = MANTISSA_BITS[dtype]
        smallest_normal = torch.finfo(dtype).smallest_normal
        self.exponent_floor = _float32_bits(smallest_normal)
        self.slack = gamma * 2.0 ** (mantissa + 3) / (1 - U32) + (
            n + 1
        ) * FLOAT32_TINY_SUBNORMAL / (smallest_normal * 2.0 ** -(mantissa + 1))
        # (1 + 2u)**2 (q + 2**-150 + 2**-150 / 2**e), in q's scale, 2**-(m+1) per ratio.
        self._tiny = 2.0**-150 + 2.0**-150 / smallest_normal
        self._scale = 2.0 ** -(mantissa + 1)
        # The threshold and w for the latest worst ratio (one tuple, replaced whole, so
        # that threads screening against different ratios each read a matching pair).
        self._screening: tuple[float, float, float] | None = None
        # Each thread's candidates, evaluated in batches: an exact pass over a few hundred
        # elements costs mostly its fixed per-call overhead.
        self._pending = threading.local()

    @staticmethod
    def applies(
        original: torch.Tensor,
        fused: torch.Tensor,
        terms: Sequence[bounds.Term],
        dtype: torch.dtype,
    ) -> bool:
        """Whether the screen's proof holds here (else every element is computed exactly)."""
        factors = [t for left, right, _ in terms for t in (left, right)]
        return (
            dtype in _SCREENED_DTYPES
            and original.dtype == dtype
            and fused.dtype == dtype
            and all(t.dtype in _FLOAT32_EXACT for t in factors)
            and all(t.device.type == "cpu" for t in (original, fused, *factors))
            and _float32_is_ieee()
        )

    def threshold(self, worst: float) -> float:
        """The float32 ``q`` below which an element's ratio is surely below ``worst``.

        ``t`` is ``worst`` less :data:`_FLOAT64_NOISE`, so that a ratio below ``t`` is below
        ``worst`` also as float64 computes it. From ``(x + w a) / h <= 2**(m+1) (1 + 2u)**2
        (q + tiny) + w slack``; ``tiny`` is a subnormal quotient's ``2**-150`` and a
        subnormal numerator's ``2**-150 / 2**e``. Not positive where nothing can be ruled
        out.
        """
        return self._settings(worst)[0]

    def _settings(self, worst: float) -> tuple[float, float]:
        """:meth:`threshold`, and ``w`` (for :meth:`_row_scale`)."""
        screening = self._screening
        if screening is None or screening[0] != worst:
            t = worst - _FLOAT64_NOISE
            # 1 - t is exact for t in [1/2, 1] (Sterbenz) and within 2**-53 of it below.
            w = max(1.0 - t, 0.0)
            scaled = (t - w * self.slack) * self._scale
            # 2**-40 covers these few float64 roundings.
            threshold = (scaled / (1 + 2 * U32) ** 2 - self._tiny) / (1 + 2.0**-40)
            screening = (worst, _float32_below(threshold), w)
            self._screening = screening
        return screening[1], screening[2]

    def _row_scale(self, w: float, start: int, stop: int) -> torch.Tensor:
        """``a'_r`` for rows ``start:stop`` (a column, float32): ``w a_r`` rounded up past
        float64's rounding and float32's, also where it is subnormal."""
        scaled = (self._row_sums[start:stop] * w) * (1 + 2.0**-20) + FLOAT32_TINY_SUBNORMAL
        return scaled.to(torch.float32)[:, None]

    def checked(
        self,
        exact: _Exact,
        original: torch.Tensor,
        fused: torch.Tensor,
        start: int,
        stop: int,
        worst: float,
    ) -> float:
        """Rows ``start:stop``'s largest ratio, or a ratio at most ``worst`` where none of
        the block's can exceed it; candidates wait for a batch (see :meth:`flush`).

        Screening against an older (smaller) ``worst`` only lets more elements through.
        """
        seeded = 0.0
        seed_rows = max(1, SEED_ELEMENTS // original.shape[1])
        compiled = kernel.screens(original, fused)
        if self.threshold(worst) <= 0 and stop - start > seed_rows:
            # No exact ratio yet to screen against (a thread's first block): its first
            # rows in float64 give one, and the screen takes the rest of the block. The
            # proof holds with any ratio found exactly, and this one is returned. (The
            # kernel against no ratio computes every element's in float64.)
            seed_stop = start + seed_rows
            if compiled:
                seeded = self._kernel_worst(exact, original, fused, start, seed_stop, 0.0)
            else:
                seeded = exact.rows(original, fused, start, seed_stop)
            start, worst = seed_stop, max(worst, seeded)
        if compiled:
            return max(seeded, self._kernel_worst(exact, original, fused, start, stop, worst))
        candidates = self.candidates(original, fused, start, stop, worst)
        if candidates is None:
            return max(seeded, exact.rows(original, fused, start, stop))
        pending: list[torch.Tensor] = self._pending.__dict__.setdefault("list", [])
        if candidates.numel():
            pending.append(candidates.add_(start * original.shape[1]))
        if sum(batch.numel() for batch in pending) < GATHER_BATCH:
            return seeded
        return max(seeded, self.flush(exact, original, fused))

    def _kernel_worst(
        self,
        exact: _Exact,
        original: torch.Tensor,
        fused: torch.Tensor,
        start: int,
        stop: int,
        worst: float,
    ) -> float:
        """One compiled pass over rows ``start:stop``: the screen, and each candidate's
        float64 ratio on the spot; their largest (or 0 where none)."""
        return kernel.screen_block(
            *self._kernel_arguments(original, fused, start, stop, worst),
            exact=exact.kernel_terms(start, stop),
        ).worst

    def flush(self, exact: _Exact, original: torch.Tensor, fused: torch.Tensor) -> float:
        """The largest ratio of this thread's waiting candidates."""
        pending: list[torch.Tensor] = self._pending.__dict__.setdefault("list", [])
        if not pending:
            return 0.0
        flat = torch.cat(pending)
        pending.clear()
        return exact.elements(original, fused, flat)

    def candidates(
        self, original: torch.Tensor, fused: torch.Tensor, start: int, stop: int, worst: float
    ) -> torch.Tensor | None:
        """Flat indices (in rows ``start:stop``) whose ratio may reach ``worst``; None
        where that is much of the block (compute it whole)."""
        threshold, w = self._settings(worst)
        if threshold <= 0:
            return None
        if kernel.screens(original, fused):
            # The same screen in one compiled pass, its product in another order than the
            # fuse's (see kernel.screen_block).
            room = int(GATHER_FRACTION * (stop - start) * original.shape[1])
            arguments = self._kernel_arguments(original, fused, start, stop, worst)
            return kernel.screen_block(*arguments, room=room).found
        merged = torch.mm(self.left[start:stop], self.right).add_(original[start:stop])
        power = merged.view(torch.int32).bitwise_and(_FLOAT32_EXPONENT_MASK)
        power = power.clamp_(min=self.exponent_floor, max=_LARGEST_POWER)
        power = power.view(torch.float32)  # 2**(m+1) h
        screened = merged.sub_(fused[start:stop]).abs_()
        screened.addcmul_(self._row_scale(w, start, stop), self.column_scale).div_(power)
        # Chunk maxima first: one cheap pass, where a full-size comparison and nonzero cost
        # several times the screen (NaN is not below the threshold, so it is kept).
        chunks = screened.view(-1, _CHUNK) if screened.numel() % _CHUNK == 0 else None
        if chunks is None:
            return _not_below(screened.view(-1), threshold, GATHER_FRACTION)
        open_chunks = _not_below(chunks.amax(dim=1), threshold, 1.0)
        assert open_chunks is not None
        if open_chunks.numel() > chunks.shape[0] // 2:
            return None
        inside = _not_below(chunks[open_chunks].view(-1), threshold, 1.0)
        assert inside is not None
        if inside.numel() > GATHER_FRACTION * screened.numel():
            return None
        return open_chunks[inside // _CHUNK] * _CHUNK + inside % _CHUNK

    def _kernel_arguments(
        self, original: torch.Tensor, fused: torch.Tensor, start: int, stop: int, worst: float
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        float,
        torch.Tensor,
        int,
        float,
    ]:
        """:func:`kernel.screen_block`'s positional arguments for rows ``start:stop``."""
        threshold, w = self._settings(worst)
        return (
            original[start:stop],
            fused[start:stop],
            self.left[start:stop],
            self.right,
            self._row_sums[start:stop],
            w,
            self.column_scale.view(-1),
            self.exponent_floor,
            threshold,
        )


def _not_below(values: torch.Tensor, threshold: float, fraction: float) -> torch.Tensor | None:
    """Indices of the values not below ``threshold`` (NaN included); None where they are
    more than ``fraction`` of all."""
    kept = (values < threshold).logical_not_().nonzero().view(-1)
    return None if kept.numel() > fraction * values.numel() else kept


def _float32_bits(value: float) -> int:
    return int(struct.unpack("<i", struct.pack("<f", value))[0])


def _float32_below(value: float) -> float:
    """The largest float32 at most ``value`` (positive, finite or not); 0.0 for the rest."""
    if not value > 0:
        return 0.0
    if value >= _FLOAT32_MAX:
        return _FLOAT32_MAX if math.isfinite(value) else math.inf
    rounded = struct.unpack("<f", struct.pack("<f", value))[0]
    if rounded > value:  # rounded up: step one float32 down (rounded >= 2**-149 here)
        rounded = struct.unpack("<f", struct.pack("<i", _float32_bits(rounded) - 1))[0]
    return float(rounded)


def _float32_is_ieee() -> bool:
    """Whether float32 matmuls and elementwise ops round as the screen's proof assumes:
    full precision (no bfloat16 or TF32 shortcut) and subnormals kept, not flushed."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    tiny = torch.full((1, 16), 2.0**-140)
    halves = torch.full((16, 1), 0.5)
    near_one = torch.full((1, 16), 1 + 2.0**-20)
    return (
        float(torch.mm(tiny, halves)) == 2.0**-137
        and float(tiny[0, :1] * 0.5) == 2.0**-141
        and float(torch.mm(near_one, torch.ones(16, 1))) == 16 * (1 + 2.0**-20)
    )


def block_bound(
    weight: torch.Tensor, terms: Sequence[bounds.Term], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`safemerge.merge_bound`'s ``(reference, bound)``, computed with fewer passes.

    The reference is computed as :func:`safemerge.bounds.reference_merge` does, to the
    bit. The bound is the same sum, ``gamma_n (|W| + sum |c32_i| P_i) + sum |c_i - c32_i|
    P_i + underflow + n * tiny`` plus half an ulp of ``dtype`` at ``|reference| + that``,
    with ``P_i = |left_i| @ |right_i|``, evaluated in another order (float64 rounding
    apart, the same number), and always positive.
    """
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
        bound += _half_ulp(reference.abs().add_(bound), dtype)
    return reference, bound


def _half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype``'s grid at each (float64, non-negative) magnitude.

    ``dtype``'s subnormals share the spacing of its smallest normal; every magnitude is
    then a normal float64, whose exponent bits are ``floor(log2(magnitude))`` exactly.
    """
    smallest_normal = torch.finfo(dtype).smallest_normal
    bits = magnitude.clamp_(min=smallest_normal).view(torch.int64)
    exponent = bits.bitwise_right_shift_(_FLOAT64_MANTISSA_BITS)  # biased, sign bit is 0
    exponent -= MANTISSA_BITS[dtype] + 1
    return exponent.bitwise_left_shift_(_FLOAT64_MANTISSA_BITS).view(torch.float64)
