"""Property tests of the guarded fuse: accuracy, exact round trip, refusal, and the guard's
decision checked against an independent oracle.

The oracle here does not use safemerge's bounds or numerics: it recomputes the merge in
float64 from the adapter tensors (elementwise products, so IEEE NaN/Inf rules apply
exactly, with no BLAS shortcuts), bounds the float32 computation's error with its own
generous bound (zero where every float32 step is provably exact), and decides with the
dtype's own cast (or, for float8_e4m3fn, whose cast saturates, with its rounding rule).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import assume, event, given, note, settings, target
from hypothesis import strategies as st
from torch import nn

import safemerge as sm
from safemerge.merge import engine

from support import merge_oracle as sms

F32_MAX = sms.F32_MAX
U32 = 2.0**-24
#: float8_e4m3fn has no Inf and torch's cast saturates at 448, so the range check must be
#: done on the float32 value: round-to-nearest-even sends |x| <= 464 to 448 (448 = 1.110b
#: x 2**8 has an even significand, so the tie 464 rounds down) and anything larger out.
E4M3_LIMIT = sms.tie_above_max(torch.float8_e4m3fn)


# --- helpers -------------------------------------------------------------------------------


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equality of these is bit-for-bit equality (NaN, -0.0 included)."""
    return tensor.detach().contiguous().view(torch.uint8).clone()


def layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    state = {"weight": bits(layer.weight)}
    if getattr(layer, "bias", None) is not None:
        state["bias"] = bits(layer.bias)
    return state


def adapter_state(pairs: list[tuple[sm.LoraAdapter, float]]) -> list[torch.Tensor]:
    state = []
    for adapter, _ in pairs:
        for tensor in (adapter.lora_A, adapter.lora_B, adapter.lora_bias, adapter.magnitude):
            if tensor is not None:
                state.append(bits(tensor))
    return state


def assert_same_bits(
    before: dict[str, torch.Tensor] | list[torch.Tensor], after: object, what: str
) -> None:
    __tracebackhide__ = True
    items = before.items() if isinstance(before, dict) else enumerate(before)
    after_items = after if isinstance(after, dict) else dict(enumerate(after))  # type: ignore[arg-type]
    for key, old in items:
        new = after_items[key]
        if not torch.equal(old, new):
            changed = int((old != new).sum())
            raise AssertionError(f"{what}[{key}] changed: {changed} of {old.numel()} bytes differ")


@contextmanager
def block_size(block_bytes: int | None) -> Iterator[None]:
    """Run the engine with smaller row blocks, so tiny tensors take the multi-block paths."""
    if block_bytes is None:
        yield
        return
    saved = engine.BLOCK_BYTES
    engine.BLOCK_BYTES = block_bytes
    try:
        yield
    finally:
        engine.BLOCK_BYTES = saved


def fits(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether each float64 value, rounded to float32, casts to a finite in-range ``dtype``."""
    as_f32 = values.to(torch.float32)
    if dtype == torch.float32:
        return torch.isfinite(as_f32)
    if dtype == torch.float8_e4m3fn:
        return as_f32.abs() <= E4M3_LIMIT  # False for NaN
    return torch.isfinite(as_f32.to(dtype).to(torch.float32))


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def lowest_bit_exponents(values: torch.Tensor) -> torch.Tensor:
    """Per element, the exponent of its lowest set bit: ``x`` is an integer times ``2**e``.

    +inf for zeros (they fit any grid), -inf for NaN/Inf (they fit none).
    """
    values = values.to(torch.float64)
    regular = torch.isfinite(values) & (values != 0)
    mantissa, exponent = torch.frexp(torch.where(regular, values, torch.ones_like(values)))
    integer = (mantissa.abs() * 2.0**53).to(torch.int64)
    lowest = torch.log2((integer & -integer).to(torch.float64))
    result = exponent.to(torch.float64) - 53 + lowest
    result = torch.where(values == 0, math.inf, result)
    return torch.where(torch.isfinite(values), result, -math.inf)


def float32_exact(value: float) -> bool:
    return float(torch.tensor(value, dtype=torch.float32)) == value


@dataclass(frozen=True)
class Verdict:
    """What the oracle expects of one tensor (weight or bias) of a fuse."""

    reference: torch.Tensor  # float64, the exact merge (NaN/Inf where the inputs force them)
    error: torch.Tensor  # float64, bound on |float32 merge - reference| (0 where exact)
    exact: torch.Tensor  # bool, every float32 step provably exact at this element
    surely_ok: torch.Tensor  # bool, fits the dtype whatever the float32 rounding did
    surely_bad: torch.Tensor  # bool, cannot fit
    counts_known: bool  # NaN/Inf/overflow classes are determined for every element
    intermediates_ok: bool  # no finite float32 intermediate can overflow

    @property
    def accept(self) -> bool:
        return bool(self.surely_ok.all()) and self.intermediates_ok

    @property
    def refuse(self) -> bool:
        return bool(self.surely_bad.any())

    @property
    def ambiguous(self) -> bool:
        return not (self.accept or self.refuse)

    def expected_counts(self, dtype: torch.dtype) -> dict[str, int]:
        reference = self.reference.reshape(-1)
        low = (reference.abs() - self.error.reshape(-1)).clamp_min(0).to(torch.float32)
        finite = torch.isfinite(reference)
        # A finite exact value can still round to Inf in float32 itself.
        float32_inf = finite & torch.isinf(low)
        bad = self.surely_bad.reshape(-1)
        return {
            "nan_count": int(torch.isnan(reference).sum()),
            "posinf_count": int(
                (reference == math.inf).sum() + (float32_inf & (reference > 0)).sum()
            ),
            "neginf_count": int(
                (reference == -math.inf).sum() + (float32_inf & (reference < 0)).sum()
            ),
            "overflow_count": int((finite & bad & ~float32_inf).sum()),
        }

    def first_bad_index(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        flat = int(self.surely_bad.reshape(-1).nonzero()[0, 0])
        index = []
        for size in reversed(shape):
            index.append(flat % size)
            flat //= size
        return tuple(reversed(index))


def _decide(
    reference: torch.Tensor,
    error: torch.Tensor,
    dtype: torch.dtype,
    intermediates_ok: bool,
    no_underflow: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    magnitude = reference.abs()
    high = magnitude + error
    low = (magnitude - error).clamp_min(0)
    surely_ok = fits(high, dtype)
    surely_bad = ~fits(low, dtype)
    finite = torch.isfinite(reference)
    determined = bool((surely_ok | surely_bad).all())
    inf_class_known = bool(
        (torch.isinf(high.to(torch.float32)) == torch.isinf(low.to(torch.float32)))[finite].all()
    )
    return (
        surely_ok,
        surely_bad,
        determined and inf_class_known and intermediates_ok and no_underflow,
    )


def predict_weight(
    case: sms.MergeCase, layer: nn.Module, pairs: list[tuple[sm.LoraAdapter, float]]
) -> Verdict:
    """The oracle for the weight, in the layer's matrix layout (row-major = the weight's)."""
    spec = case.layer
    rows, columns = spec.matrix_shape
    weight = layer.weight.detach().to(torch.float64).reshape(rows, columns)
    lefts, rights, coefficients = [], [], []
    for (adapter, _), coefficient in zip(pairs, case.coefficients, strict=True):
        rank = adapter.lora_A.shape[0]
        b = adapter.lora_B.detach().to(torch.float64).reshape(spec.out_features, rank)
        a = adapter.lora_A.detach().to(torch.float64).reshape(rank, -1)
        left, right = (a.T, b.T) if spec.transposed else (b, a)
        lefts.append(left)
        rights.append(right)
        coefficients.append(coefficient)
    total_rank = sum(left.shape[1] for left in lefts)

    reference = weight.clone()
    magnitude = weight.abs()
    finite_magnitude = torch.where(torch.isfinite(weight), weight.abs(), 0)
    grid = lowest_bit_exponents(weight)
    no_underflow = True
    folded_max = 0.0
    column_mass = torch.zeros(columns, dtype=torch.float64)
    for left, right, c in zip(lefts, rights, coefficients, strict=True):
        # Elementwise products and a plain sum: IEEE semantics, 0 * Inf = NaN included.
        reference = reference + c * (left[:, :, None] * right[None, :, :]).sum(dim=1)
        magnitude = magnitude + abs(c) * (left.abs() @ right.abs())
        finite_left = torch.where(torch.isfinite(left), left, 0)
        finite_right = torch.where(torch.isfinite(right), right, 0)
        finite_magnitude = finite_magnitude + abs(c) * (finite_left.abs() @ finite_right.abs())
        column_mass = column_mass + finite_right.abs().sum(dim=0)
        folded = c * finite_left
        folded_max = max(folded_max, float(folded.abs().max()) if folded.numel() else 0.0)
        # The engine folds c into the left factor in float32: that product must not flush
        # to zero where the exact one is not (0 * Inf = NaN would replace an Inf).
        nonzero = folded != 0
        no_underflow &= bool((folded.abs()[nonzero] > 2.0**-149).all()) and (
            c == 0 or float(torch.tensor(c, dtype=torch.float32)) != 0
        )
        # Exactness: c and c*left exact in float32, then every product and partial sum is a
        # multiple of 2**grid bounded by the magnitude.
        folded_exact = (c * left).to(torch.float32).to(torch.float64) == c * left
        folded_grid = torch.where(
            folded_exact & float32_exact(c), lowest_bit_exponents(c * left), -math.inf
        )
        products = (folded_grid[:, :, None] + lowest_bit_exponents(right)[None, :, :]).nan_to_num(
            nan=-math.inf
        )
        grid = torch.minimum(grid, products.amin(dim=1) if products.shape[1] else grid)
    exact = (magnitude < torch.exp2(grid + 24)) & (grid >= -149) & (magnitude <= F32_MAX)
    n = total_rank + 3
    # Generous (twice the rounding count, plus absolute floors scaled by what multiplies a
    # subnormal rounding) on purpose: the oracle only uses it to decide what is ambiguous.
    floor = 2.0**-146 * n * (1 + column_mass)[None, :] * (1 + folded_max)
    error = torch.where(exact, 0.0, 2 * gamma(n) * magnitude + floor)
    intermediates_ok = (
        bool((finite_magnitude < F32_MAX * (1 - 2.0**-16)).all()) and folded_max < F32_MAX / 2
    )
    surely_ok, surely_bad, counts_known = _decide(
        reference, error, spec.dtype, intermediates_ok, no_underflow
    )
    shape = spec.weight_shape
    return Verdict(
        reference.reshape(shape),
        error.reshape(shape),
        exact.reshape(shape),
        surely_ok.reshape(shape),
        surely_bad.reshape(shape),
        counts_known,
        intermediates_ok,
    )


def predict_bias(
    case: sms.MergeCase, layer: nn.Module, pairs: list[tuple[sm.LoraAdapter, float]]
) -> Verdict | None:
    """The oracle for the bias (``b + sum(c * lora_bias)``), or None when it is not changed."""
    bias = getattr(layer, "bias", None)
    if bias is None or all(adapter.lora_bias is None for adapter, _ in pairs):
        return None
    reference = bias.detach().to(torch.float64).clone()
    magnitude = reference.abs()
    largest_term = 0.0
    count = 0
    no_underflow = True
    for (adapter, _), c in zip(pairs, case.coefficients, strict=True):
        if adapter.lora_bias is not None:
            lora_bias = adapter.lora_bias.detach().to(torch.float64).reshape(-1)
            reference = reference + c * lora_bias
            magnitude = magnitude + abs(c) * lora_bias.abs()
            finite = torch.where(torch.isfinite(lora_bias), lora_bias, 0)
            largest_term = max(largest_term, abs(c) * float(finite.abs().max()))
            count += 1
            # float32 products that flush to zero turn an Inf into NaN (0 * Inf).
            scaled = (c * finite).abs()
            no_underflow &= bool((scaled[finite != 0] > 2.0**-149).all()) and (
                c == 0 or float(torch.tensor(c, dtype=torch.float32)) != 0
            )
    # Per term: c rounded to float32, the product, the sum: three roundings each.
    n = 3 * count + 2
    error = gamma(n) * magnitude + 2.0**-149 * n * (1 + largest_term)
    finite_magnitude = torch.where(torch.isfinite(magnitude), magnitude, 0)
    intermediates_ok = bool((finite_magnitude < F32_MAX * (1 - 2.0**-16)).all())
    surely_ok, surely_bad, counts_known = _decide(
        reference, error, bias.dtype, intermediates_ok, no_underflow
    )
    return Verdict(
        reference,
        error,
        torch.zeros_like(reference, dtype=torch.bool),
        surely_ok,
        surely_bad,
        counts_known,
        intermediates_ok,
    )


def half_ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at each magnitude (0 for float32): the cast's error."""
    if dtype == torch.float32:
        return torch.zeros_like(values)
    info = torch.finfo(dtype)
    binade = torch.exp2(
        torch.floor(torch.log2(values.abs().clamp_min(float(info.smallest_normal))))
    )
    return binade * float(info.eps) / 2


def label(
    case: sms.MergeCase,
    layer: nn.Module,
    pairs: list[tuple[sm.LoraAdapter, float]],
    verdict: Verdict,
) -> set[str]:
    """What a case actually contains (read from its tensors, not from the generator's intent)."""
    labels = {
        f"kind={case.layer.kind}",
        f"dtype={str(case.layer.dtype).removeprefix('torch.')}",
        f"family={case.category}",
    }
    for adapter, _ in pairs:
        for name in ("lora_A", "lora_B", "lora_bias"):
            tensor = getattr(adapter, name)
            if tensor is None:
                continue
            flat = tensor.detach().reshape(-1).to(torch.float32)
            if bool(torch.isnan(flat).any()):
                labels.add("planted NaN")
            if bool((flat == math.inf).any()):
                labels.add("planted +Inf")
            if bool((flat == -math.inf).any()):
                labels.add("planted -Inf")
            if name != "lora_bias" and not bool(torch.isfinite(flat[-1])):
                labels.add("non-finite at the last element of A or B")
        a = adapter.lora_A.detach().to(torch.float64).reshape(adapter.lora_A.shape[0], -1)
        b = adapter.lora_B.detach().to(torch.float64).reshape(adapter.lora_B.shape[0], -1)
        products = (b.abs().amax(dim=0) * a.abs().amax(dim=1)).max()
        if torch.isfinite(products) and float(products) > sms.F16_MAX:
            # The largest single product |B[i,k] * A[k,j]| (row max times column max, same k).
            labels.add("single products overflow float16")
    reference = verdict.reference
    if (
        case.layer.dtype != torch.float32
        and bool(torch.isfinite(reference.to(torch.float32)).all())
        and bool(verdict.surely_bad.any())
    ):
        labels.add("finite in float32, overflows on the cast")
    if min(case.layer.out_features, case.layer.in_features) < max(
        spec.rank for spec in case.adapters
    ):
        labels.add("rank > min(out, in)")
    if case.block_bytes is not None:
        labels.add("several row blocks")
    if not bool(torch.isfinite(layer.weight.detach().to(torch.float32)).all()):
        labels.add("non-finite weight")
    if case.layer.strided:
        labels.add("non-contiguous weight")
    if not case.exact_unfuse:
        labels.add("exact_unfuse=False")
    return labels


def fuse_checked(
    case: sms.MergeCase, layer: nn.Module, pairs: list[tuple[sm.LoraAdapter, float]]
) -> tuple[sm.FuseRecord | None, sm.NonFiniteMergeError | None]:
    """Fuse; on refusal check atomicity (layer and adapters bit-identical) and return the error."""
    __tracebackhide__ = True
    weight_object, pointer = layer.weight, layer.weight.data_ptr()
    before, adapters_before = layer_state(layer), adapter_state(pairs)
    with block_size(case.block_bytes):
        try:
            record = sm.fuse(
                layer, pairs, scale=case.scale, name="probe", exact_unfuse=case.exact_unfuse
            )
        except sm.NonFiniteMergeError as error:
            assert_same_bits(before, layer_state(layer), "layer after a refused fuse")
            assert_same_bits(adapters_before, adapter_state(pairs), "adapter after a refused fuse")
            assert layer.weight is weight_object and layer.weight.data_ptr() == pointer
            return None, error
    assert_same_bits(adapters_before, adapter_state(pairs), "adapter after fuse")
    assert layer.weight is weight_object, "fuse replaced the weight Parameter"
    assert layer.weight.data_ptr() == pointer, "fuse moved the weight's storage"
    assert (
        layer.weight.dtype == case.layer.dtype
        and tuple(layer.weight.shape) == case.layer.weight_shape
    )
    return record, None


def check_accuracy(layer: nn.Module, reference: torch.Tensor, bound: torch.Tensor) -> float:
    """Assert ``|weight - reference| <= bound`` everywhere; return the worst error/bound ratio."""
    __tracebackhide__ = True
    fused = layer.weight.detach().to(torch.float64)
    error = (fused - reference).abs()
    ok = error <= bound
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        worst = int((error / bound).reshape(-1).nan_to_num(nan=math.inf).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), reference.shape))
        raise AssertionError(
            f"{len(bad)} of {reference.numel()} elements outside the bound; worst at {index}: "
            f"fused={float(fused[index])!r} reference={float(reference[index])!r} "
            f"error={float(error[index])!r} bound={float(bound[index])!r}"
        )
    ratio = (error / bound).nan_to_num(nan=0.0)
    return float(ratio.max()) if ratio.numel() else 0.0


def check_refusal(
    case: sms.MergeCase,
    error: sm.NonFiniteMergeError,
    weight: Verdict,
    bias: Verdict | None,
    *,
    weight_fits: bool = False,
) -> None:
    """The error's facts agree with the oracle wherever the oracle determines them.

    ``weight_fits``: the weight is known to have passed (DoRA, checked by the caller).
    """
    __tracebackhide__ = True
    assert error.layer == "probe"
    assert 0 < error.bad_count <= error.numel
    assert (
        error.bad_count
        == error.nan_count + error.posinf_count + error.neginf_count + error.overflow_count
    )
    # When both the weight and the bias are bad, either may be the one reported (the order
    # of the checks is not part of the contract); otherwise it must be the bad one.
    weight_bad = weight.refuse and not weight_fits
    bias_bad = bias is not None and bias.refuse
    if weight_bad and (error.tensor == "weight" or not bias_bad):
        verdict, tensor, dtype, shape = weight, "weight", case.layer.dtype, case.layer.weight_shape
    elif bias_bad and (weight_bad or weight_fits or weight.accept):
        assert bias is not None
        verdict, tensor, dtype, shape = (
            bias,
            "bias",
            case.layer.bias_dtype,
            (case.layer.out_features,),
        )
    else:
        event("refusal: which tensor is not determined by the oracle")
        return
    event(f"refused tensor={tensor}")
    assert (error.tensor, error.dtype, error.shape, error.numel) == (
        tensor,
        dtype,
        shape,
        math.prod(shape),
    )
    reference = verdict.reference
    if bool(torch.isnan(reference).any()):
        assert error.nan_count > 0, "the exact merge has NaN but the error counts none"
    if bool((reference == math.inf).any()):
        assert error.posinf_count + error.nan_count > 0
    if bool((reference == -math.inf).any()):
        assert error.neginf_count + error.nan_count > 0
    if not verdict.counts_known:
        event("refusal: counts not determined by the oracle")
        return
    event("refusal: counts checked exactly")
    counts = {
        name: getattr(error, name)
        for name in ("nan_count", "posinf_count", "neginf_count", "overflow_count")
    }
    assert counts == verdict.expected_counts(dtype)
    assert error.first_index == verdict.first_bad_index(shape)


def check_bias_accuracy(layer: nn.Module, bias: Verdict) -> None:
    __tracebackhide__ = True
    fused = layer.bias.detach().to(torch.float64)
    bound = bias.error + half_ulp(bias.reference.abs() + bias.error, layer.bias.dtype)
    error = (fused - bias.reference).abs()
    assert bool((error <= bound).all()), (
        f"bias outside its bound: error={error.tolist()} bound={bound.tolist()}"
    )


def run_case(case: sms.MergeCase) -> tuple[str, float]:
    """Fuse ``case`` and check everything the oracle (or, for DoRA, the library's reference)
    decides. Returns the outcome ("accepted"/"refused") and the worst error/bound ratio."""
    __tracebackhide__ = True
    layer, pairs = case.build()
    weight = predict_weight(case, layer, pairs)
    bias = predict_bias(case, layer, pairs)
    reference, bound = sm.expected_fuse(layer, pairs, scale=case.scale)
    for name in sorted(label(case, layer, pairs, weight)):
        event(name)
    _, error = fuse_checked(case, layer, pairs)
    outcome = "refused" if error is not None else "accepted"
    event(f"outcome={outcome}")
    note(
        f"weight oracle: accept={weight.accept} refuse={weight.refuse}; bias oracle: {bias and (bias.accept, bias.refuse)}"
    )
    if error is not None:
        if case.is_dora and error.tensor == "weight":
            # DoRA renormalises; the oracle does not model it, the library's reference does.
            assert not bool(fits(reference.abs() + bound, case.layer.dtype).all()), (
                f"refused a DoRA merge that fits: {error}"
            )
        elif case.is_dora:
            assert bias is not None and not bias.accept, f"refused a bias that fits: {error}"
            if bias.refuse:
                check_refusal(case, error, weight, bias, weight_fits=True)
        else:
            assert not (weight.accept and (bias is None or bias.accept)), (
                f"refused although the oracle says the merge fits: {error}"
            )
            check_refusal(case, error, weight, bias)
        return outcome, 0.0
    if not case.is_dora:
        assert not weight.refuse, (
            "accepted although the exact merge does not fit the weight's dtype"
        )
    assert bias is None or not bias.refuse, "accepted although the merged bias does not fit"
    ratio = check_accuracy(layer, reference, bound)
    if not case.is_dora and bool(weight.exact.any()):
        # Every float32 step exact: the fused value is the exact sum rounded once.
        exact = weight.exact
        expected = weight.reference.to(torch.float32).to(case.layer.dtype).to(torch.float64)
        got = layer.weight.detach().to(torch.float64)
        assert bool((got[exact] == expected[exact]).all()), (
            "an exactly computable element differs from its single rounding"
        )
    if bias is not None:
        check_bias_accuracy(layer, bias)
    return outcome, ratio


# --- 1. accuracy -----------------------------------------------------------------------


def _one_by_one(
    weight: float, adapter: sms.AdapterSpec, scale: float, category: str
) -> sms.MergeCase:
    """A float32 Linear(1, 1) holding ``weight``, with one adapter: the shape of shrunk failures."""
    layer = sms.LayerSpec(
        kind="linear",
        out_features=1,
        in_features=1,
        kernel=(),
        dtype=torch.float32,
        has_bias=False,
        seed=0,
        weight_std=0.0,
        weight_sets=((0, weight),),
    )
    return sms.MergeCase(layer, (adapter,), scale, category)


@given(case=sms.general_cases())
def test_fused_weight_is_within_the_error_bound(case: sms.MergeCase) -> None:
    _, ratio = run_case(case)
    target(ratio, label="worst |fused - reference| / bound")


# Library bugs the property above found (shrunk, then written out by hand), checked on every
# run whatever the profile draws. Kept out of the @given test as @example so that they do not
# stop its exploration (Hypothesis generates nothing once an explicit example fails).
FOUND_CASES = {
    # scale * B is a float32 subnormal: its rounding error, times |A|, beat the bound
    # (fixed in 91d0cbe: the bound now counts the coefficient's rounding and underflow).
    "tiny-scale-subnormal-product": _one_by_one(
        0.0,
        sms.AdapterSpec(1, 0, 0.0, 0.0, sets=(("lora_A", 0, 1e4), ("lora_B", 0, 1.5e-9))),
        1e-30,
        "tiny-scale",
    ),
    # DoRA: magnitude / norm is a float32 subnormal when the norm is huge; its rounding beat
    # the bound (fixed in 8f1ead2: the bound now allows an absolute rounding of the factor).
    "dora-subnormal-factor": _one_by_one(
        3e38, sms.AdapterSpec(1, 0, 0.0, 0.0, magnitude_std=0.1), 1.0, "dora"
    ),
    # DoRA: magnitude / norm overflows float32 when the norm is tiny, and the fuse refuses.
    "dora-factor-overflow": _one_by_one(
        1e-41, sms.AdapterSpec(1, 0, 0.0, 0.0, magnitude_std=0.1), 1.0, "dora"
    ),
}


@pytest.mark.parametrize("case", FOUND_CASES.values(), ids=FOUND_CASES.keys())
def test_fused_weight_is_within_the_error_bound_at_found_cases(case: sms.MergeCase) -> None:
    @settings(max_examples=1, database=None)
    @given(st.just(case))
    def check(case: sms.MergeCase) -> None:  # run_case records events: inside a test only
        run_case(case)

    check()


# --- 2. exact round trip ---------------------------------------------------------------


@given(case=sms.general_cases(scale_strategy=sms.scales(extreme=False)))
def test_exact_unfuse_restores_every_bit(case: sms.MergeCase) -> None:
    case = replace(case, exact_unfuse=True)
    layer, pairs = case.build()
    weight_object, pointer = layer.weight, layer.weight.data_ptr()
    requires_grad = layer.weight.requires_grad
    before, adapters_before = layer_state(layer), adapter_state(pairs)
    event(f"kind={case.layer.kind}")
    event(f"dtype={str(case.layer.dtype).removeprefix('torch.')}")
    event(f"family={case.category}")
    record, _ = fuse_checked(case, layer, pairs)  # a refusal is checked atomic there
    event(f"outcome={'refused' if record is None else 'accepted'}")
    if record is None:
        return
    changed = not torch.equal(before["weight"], bits(layer.weight))
    event(f"fuse changed the weight: {changed}")
    with block_size(case.block_bytes):
        sm.unfuse(layer, record, exact=True)
    assert_same_bits(before, layer_state(layer), "layer after exact unfuse")
    assert_same_bits(adapters_before, adapter_state(pairs), "adapter after unfuse")
    assert layer.weight is weight_object and layer.weight.data_ptr() == pointer
    assert layer.weight.dtype == case.layer.dtype
    assert tuple(layer.weight.shape) == case.layer.weight_shape
    assert layer.weight.device == torch.device("cpu")
    assert layer.weight.requires_grad == requires_grad


# --- 3. refusal of adversarial adapters --------------------------------------------------


@given(case=sms.adversarial_cases())
def test_adversarial_adapters_are_refused_atomically(case: sms.MergeCase) -> None:
    layer, pairs = case.build()
    weight = predict_weight(case, layer, pairs)
    bias = predict_bias(case, layer, pairs)
    if case.category in ("planted", "cast-only"):
        # By construction these cannot fit: the strategies are checked here too.
        assert weight.refuse or (bias is not None and bias.refuse)
    assume(not (weight.ambiguous or (bias is not None and bias.ambiguous)))  # see the test below
    outcome, _ = run_case(case)
    if case.category == "planted":
        assert outcome == "refused"


# --- 4. the guard agrees with the oracle, both ways -------------------------------------


@given(
    case=st.one_of(
        sms.general_cases(allow_dora=False),
        sms.general_cases(allow_dora=False, dtypes=sms.NARROW_DTYPES, specials=True),
        sms.adversarial_cases(),
    )
)
def test_guard_decision_agrees_with_an_independent_oracle(case: sms.MergeCase) -> None:
    layer, pairs = case.build()
    weight = predict_weight(case, layer, pairs)
    bias = predict_bias(case, layer, pairs)
    # Within the float32 error bound of the dtype's threshold (or where a float32
    # intermediate could overflow) the engine may legitimately decide either way; every
    # other case must go the oracle's way. Exactly computable sums are never ambiguous, so
    # the boundary family still tests the threshold itself.
    ambiguous = weight.ambiguous or (bias is not None and bias.ambiguous)
    event(f"oracle ambiguous: {ambiguous}")
    assume(not ambiguous)
    run_case(case)


# --- 5. exploration evidence ----------------------------------------------------------------

REQUIRED_LABELS = (
    "planted NaN",
    "planted +Inf",
    "planted -Inf",
    "non-finite at the last element of A or B",
    "single products overflow float16",
    "finite in float32, overflows on the cast",
    "outcome=refused",
    "outcome=accepted",
)


def test_adversarial_generation_covers_every_category() -> None:
    """Every adversarial family is really generated, and fuses are both refused and accepted.

    Up to four runs of the inner test: Hypothesis's choices are not uniform, and a single
    run of 150 examples can (rarely) miss one label; four in a row cannot in practice.
    Under the derandomized ``ci`` profile every run is the same, so the first decides.
    """
    seen: Counter[str] = Counter()

    @settings(max_examples=150, database=None)
    @given(case=sms.adversarial_cases())
    def explore(case: sms.MergeCase) -> None:
        layer, pairs = case.build()
        weight = predict_weight(case, layer, pairs)
        seen.update(label(case, layer, pairs, weight))
        try:
            with block_size(case.block_bytes):
                sm.fuse(layer, pairs, scale=case.scale, exact_unfuse=case.exact_unfuse)
        except sm.NonFiniteMergeError:
            seen["outcome=refused"] += 1
        else:
            seen["outcome=accepted"] += 1

    for _ in range(1 if settings.default.derandomize else 4):
        explore()
        if all(seen[name] for name in REQUIRED_LABELS):
            break
    missing = [name for name in REQUIRED_LABELS if seen[name] == 0]
    assert not missing, f"never generated: {missing}; seen: {dict(seen)}"


# --- the oracle's own footing --------------------------------------------------------------


@pytest.mark.parametrize("dtype", sms.WEIGHT_DTYPES)
def test_oracle_range_rule_matches_the_library_threshold(dtype: torch.dtype) -> None:
    """The oracle's fits() and safemerge's overflow_threshold draw the same line."""
    from safemerge.merge.numerics import overflow_threshold

    threshold = overflow_threshold(dtype)
    if math.isinf(threshold):
        assert bool(fits(torch.tensor([F32_MAX], dtype=torch.float64), dtype).all())
        return
    below = float(torch.nextafter(torch.tensor(threshold, dtype=torch.float32), torch.tensor(0.0)))
    values = torch.tensor([below, threshold, -below, -threshold], dtype=torch.float64)
    assert fits(values, dtype).tolist() == [True, False, True, False]
