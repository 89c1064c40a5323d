"""The properties of the tensor-level contract, one function each, shared by the
generated-case suite and the model suite.

Each check takes the implementation, one :class:`Checked` case and the summary row to
fill; it raises AssertionError naming the property (``[accuracy] ...``) and saying how
badly it broke.
"""

from __future__ import annotations

import torch
from hypothesis import target
from hypothesis.control import currently_in_test_context

import safemerge
from pytest_safemerge import assertions
from pytest_safemerge.implementations import Call, Implementation, LayerCall, describe_error
from pytest_safemerge.results import Row
from pytest_safemerge.strategies import MergeCase
from safemerge.merge.numerics import FLOAT32_RANGE_LIMIT


class Checked:
    """One case handed to the implementation: inputs on the device under test, and what
    they held before the call."""

    def __init__(self, case: MergeCase, device: str) -> None:
        self.case = case
        self.device = device
        self.weight = case.weight.to(device).clone()
        self.original = case.weight.clone()
        # Keep the adapter's strides (non-contiguous cases stay non-contiguous on the CPU).
        self.lora_A = case.adapter.lora_A.to(device)
        self.lora_B = case.adapter.lora_B.to(device)
        # The one number the tensor contract passes as `scale`: the case's scale times the
        # adapter's alpha/r (or alpha/sqrt(r)), so the implementation sees B @ A unscaled.
        self.coefficient = float(case.scale * case.adapter.scale)
        self._exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._comfortably_finite: bool | None = None

    def again(self) -> Checked:
        """The same case with a fresh copy of the weight (the exact merge is not redone)."""
        fresh = Checked(self.case, self.device)
        fresh._exact, fresh._comfortably_finite = self._exact, self._comfortably_finite
        return fresh

    @property
    def reference(self) -> torch.Tensor:
        """The exact merge, in float64."""
        return self._parts()[0]

    @property
    def accumulated(self) -> torch.Tensor:
        """Per element, the most a correct float32 merge can be off before the cast."""
        return self._parts()[1]

    @property
    def bound(self) -> torch.Tensor:
        """Per element, the most a correct float32 merge and its cast can be off."""
        return self._parts()[2]

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Computed once, and only for the properties that need it: for a large weight it
        # costs more than the merge itself.
        if self._exact is None:
            self._exact = safemerge.merge_bound_parts(
                self.original,
                [(self.case.adapter.lora_B, self.case.adapter.lora_A, self.coefficient)],
                self.original.dtype,
            )
        return self._exact

    @property
    def threshold(self) -> float:
        """The smallest magnitude that does not fit the weight's dtype after rounding (for
        float32, the one where the float32 sum itself becomes Inf)."""
        return safemerge.numerics.range_limit(self.original.dtype)

    def comfortably_finite(self) -> bool:
        """The float32 merge is surely below the dtype's overflow threshold (so its cast is
        finite: the threshold already holds the cast's rounding), and every float32
        intermediate of the scaled product is finite in whichever order a correct merge
        computes it (``scale * B``, ``B @ A``, then the scaling, or the scaled delta): the
        delta alone may be far beyond the weight's dtype (a delta-overflow case), but
        never beyond float32's."""
        if self._comfortably_finite is None:
            reach = self.reference.abs() + self.accumulated
            adapter = self.case.adapter
            lora_B, lora_A = adapter.lora_B.double().abs(), adapter.lora_A.double().abs()
            coefficient = abs(self.coefficient)
            largest = max(
                _largest(lora_B @ lora_A) * max(coefficient, 1.0),
                coefficient * _largest(lora_B),
                coefficient * _largest(lora_A),
            )
            # A margin far above the float32 rounding of the r-term sums (r * 2**-24).
            within_float32 = largest * (1 + 2**-10) < FLOAT32_RANGE_LIMIT
            self._comfortably_finite = bool((reach < self.threshold).all()) and within_float32
        return self._comfortably_finite

    def surely_overflows(self) -> bool:
        """Some element of the float32 merge is surely at or beyond the dtype's overflow
        threshold (or is NaN): its cast is not finite, or saturates."""
        if self.comfortably_finite():
            return False
        beyond = (self.reference.abs() - self.accumulated) >= self.threshold
        return bool((beyond | torch.isnan(self.reference)).any())

    def fraction(self, result: torch.Tensor) -> float:
        return worst_fraction(result, self.reference, self.bound)


def _largest(values: torch.Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def worst_fraction(actual: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    """The largest ``|actual - reference| / bound`` (an exact element counts 0, even where
    its bound is 0), for the summary's "worst/bound" column."""
    error = (actual.detach().cpu().to(torch.float64) - reference).abs()
    ratio = torch.where(error == 0, torch.zeros_like(error), error / bound)
    return float(ratio.max()) if ratio.numel() else 0.0


def _unfuse_bound(
    merged: torch.Tensor, adapter: safemerge.LoraAdapter, scale: float
) -> torch.Tensor:
    """The bound of an arithmetic unfuse of ``adapter`` at ``scale`` from ``merged``: added to
    the fuse's bound, it bounds ``|unfuse(fuse(W)) - W|`` (the triangle inequality)."""
    merged = merged.detach().cpu()
    return safemerge.merge_bound(merged, [(adapter.lora_B, adapter.lora_A, -scale)], merged.dtype)[
        1
    ]


def _non_finite_summary(result: torch.Tensor) -> str:
    values = result.detach().cpu().float()
    return (
        f"{int(torch.isnan(values).sum())} NaN, {int(torch.isposinf(values).sum())} +Inf, "
        f"{int(torch.isneginf(values).sum())} -Inf of {values.numel()} elements"
    )


def _fail(prop: str, message: str) -> None:
    __tracebackhide__ = True
    raise AssertionError(f"[{prop}] {message}")


class UnsupportedCase(AssertionError):
    """The implementation crashed on a case whose merge is finite: it looks as if it does
    not support the case's dtype (or layer kind). The cell fails, reported as unsupported."""


def refused(prop: str, checked: Checked, call: Call) -> bool:
    """Whether the call refused; a crash (an exception not in ``refusal_errors``) fails."""
    __tracebackhide__ = True
    dtype = str(checked.original.dtype).removeprefix("torch.")
    case = checked.case
    return refused_or_crashed(
        prop,
        call,
        must_refuse=case.must_refuse,
        what=f"{case.kind} case in {dtype}" + (f": {case.detail}" if case.detail else ""),
        unsupported=f"{dtype} weights",
        declare="dtypes = {torch.float32, torch.bfloat16}",
    )


def refused_or_crashed(
    prop: str,
    call: Call | LayerCall,
    *,
    must_refuse: bool,
    what: str,
    unsupported: str,
    declare: str,
) -> bool:
    """Whether ``call`` refused. A crash (an exception not in the implementation's
    ``refusal_errors``) fails ``prop``: as "refused by crashing" where a refusal was due,
    as an unsupported case (:class:`UnsupportedCase`) where the merge is finite."""
    __tracebackhide__ = True
    if not call.crashed:
        return call.refused
    if must_refuse:
        _fail(
            prop,
            f"refused by crashing: {describe_error(call.error)} (on a {what}). A refusal "
            f"raises one of the implementation's refusal_errors (ValueError by default); "
            f"declare refusal_errors = (MyError,) if it refuses with another exception",
        )
    raise UnsupportedCase(
        f"[{prop}] crashed on a case whose merge is finite ({what}): "
        f"{describe_error(call.error)}. It looks as if {unsupported} are unsupported: "
        f"declare what the implementation supports ({declare} on the object) or choose the "
        f"cells with --safemerge-dtypes or -k; if this exception is a refusal, raise "
        f"ValueError or declare refusal_errors"
    )


def check_not_silently_non_finite(prop: str, checked: Checked, call: Call) -> None:
    """A call that did not refuse must not have produced a non-finite or overflowed value."""
    __tracebackhide__ = True
    if call.refused or call.result is None:
        return
    result = call.result.detach().cpu()
    if not bool(torch.isfinite(result.float()).all()):
        _fail(
            prop,
            f"fuse returned without refusing a merge that is not finite in {result.dtype}: "
            f"the weight now holds {_non_finite_summary(result)}",
        )
    if checked.surely_overflows():
        _fail(
            prop,
            f"fuse returned without refusing a merge beyond {checked.original.dtype}'s range "
            f"(|exact| up to {float(checked.reference.abs().max()):.6g}, threshold "
            f"{checked.threshold:.6g}): the cast saturated or overflowed silently",
        )


def check_accurate(implementation: Implementation, checked: Checked, row: Row) -> None:
    """Within the bound of a float32 merge and one rounding; a finite merge is not refused."""
    __tracebackhide__ = True
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if refused("accuracy", checked, call):
        if checked.comfortably_finite():
            _fail(
                "accuracy",
                f"fuse refused a merge whose exact result fits {checked.original.dtype} "
                f"(largest |exact| {float(checked.reference.abs().max()):.6g}): "
                f"{type(call.error).__name__}: {call.error}",
            )
        return
    check_not_silently_non_finite("accuracy", checked, call)
    assert call.result is not None
    result = call.result.detach().cpu()
    if not checked.comfortably_finite():
        return  # near the dtype's limit: only refusal and finiteness are checked
    if (result.shape, result.dtype) != (checked.original.shape, checked.original.dtype):
        _fail(
            "accuracy",
            f"the fused weight changed form: shape {tuple(result.shape)} dtype {result.dtype}, "
            f"expected shape {tuple(checked.original.shape)} dtype {checked.original.dtype}",
        )
    fraction = checked.fraction(result)
    row.observe(fraction)
    if currently_in_test_context():  # steer Hypothesis towards the largest errors
        target(fraction, label="error as a fraction of the bound")
    assertions.assert_within_bound(
        result, checked.reference, checked.bound, what="[accuracy] the fused weight"
    )


def check_form(implementation: Implementation, checked: Checked, row: Row) -> None:
    """dtype, shape and device kept; fuse returns a Tensor or None."""
    __tracebackhide__ = True
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if refused("form", checked, call):
        return
    if call.returned is not None and not isinstance(call.returned, torch.Tensor):
        _fail("form", f"fuse returned a {type(call.returned).__name__}; expected a Tensor or None")
    assert call.result is not None
    expected = (tuple(checked.weight.shape), checked.weight.dtype, checked.weight.device)
    actual = (tuple(call.result.shape), call.result.dtype, call.result.device)
    if actual != expected:
        _fail(
            "form",
            f"the merged weight has shape {actual[0]}, dtype {actual[1]}, device "
            f"{actual[2]}; expected shape {expected[0]}, dtype {expected[1]}, device {expected[2]}",
        )


def check_adapters_unmodified(implementation: Implementation, checked: Checked, row: Row) -> None:
    """lora_A and lora_B hold the same bits after the call, refused or not."""
    __tracebackhide__ = True
    before = [
        (name, tensor.clone())
        for name, tensor in (("lora_A", checked.lora_A), ("lora_B", checked.lora_B))
    ]
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    refused("adapters unmodified", checked, call)
    for (name, old), new in zip(before, (checked.lora_A, checked.lora_B), strict=True):
        assertions.assert_unchanged(old, new, what=f"[adapters unmodified] {name}")


def _assert_refused(checked: Checked, call: Call) -> None:
    __tracebackhide__ = True
    if not refused("refusal", checked, call):
        assert call.result is not None
        _fail(
            "refusal",
            f"fuse did not refuse a merge that is not finite in {checked.original.dtype} "
            f"({checked.case.kind}: {checked.case.detail}; scale {checked.coefficient!r}); "
            f"the weight it produced holds {_non_finite_summary(call.result)}",
        )


def check_refused(implementation: Implementation, checked: Checked, row: Row) -> None:
    """The call raised: the merge is not finite in the dtype."""
    __tracebackhide__ = True
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    _assert_refused(checked, call)


def check_atomic(implementation: Implementation, checked: Checked, row: Row) -> None:
    """A refusal left every bit of the weight as it was."""
    __tracebackhide__ = True
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if refused("atomicity", checked, call):
        assertions.assert_atomic(checked.original, checked.weight.detach().cpu())


def check_round_trip(implementation: Implementation, checked: Checked, row: Row) -> None:
    """unfuse(fuse(W)) is W within both merges' bounds, or exactly when claimed."""
    __tracebackhide__ = True
    fused = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if refused("round trip", checked, fused) or not checked.comfortably_finite():
        return
    assert fused.result is not None
    merged = fused.result
    merged_cpu = merged.detach().cpu().clone()
    restored = _unfused(implementation, "round trip", merged, checked).detach().cpu()
    if implementation.exact_unfuse:
        assertions.assert_roundtrip(checked.original, restored, max_ulps=0)
        row.observe(0.0)
        return
    bound = checked.bound + _unfuse_bound(merged_cpu, checked.case.adapter, checked.coefficient)
    row.observe(worst_fraction(restored, checked.original.to(torch.float64), bound))
    assertions.assert_within_bound(
        restored, checked.original.to(torch.float64), bound, what="[round trip] the unfused weight"
    )


def _unfused(
    implementation: Implementation, prop: str, merged: torch.Tensor, checked: Checked
) -> torch.Tensor:
    """``unfuse`` of ``checked``'s adapter from ``merged``; refusing it is a failure."""
    __tracebackhide__ = True
    call = implementation.unfuse(merged, checked.lora_A, checked.lora_B, checked.coefficient)
    if call.refused:
        _fail(
            prop,
            f"unfuse raised on undoing a fuse it accepted: {describe_error(call.error)}",
        )
    assert call.result is not None
    return call.result


def check_stacked_round_trip(implementation: Implementation, checked: Checked, row: Row) -> None:
    """fuse A1, fuse A2, unfuse A2 gives the weight after A1 (exactly when claimed); with
    an exact unfuse, unfusing A1 then gives the original."""
    __tracebackhide__ = True
    first = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if refused("stacked round trip", checked, first) or not checked.comfortably_finite():
        return
    assert first.result is not None
    after_first = first.result
    snapshot = after_first.detach().cpu().clone()
    adapter = checked.case.adapter
    other = safemerge.LoraAdapter(adapter.lora_A.flip(0) * 0.5, adapter.lora_B.flip(1))
    second_case = MergeCase(snapshot, other, checked.case.scale, checked.case.kind)
    second = Checked(second_case, checked.device)
    fused_twice = implementation.fuse(after_first, second.lora_A, second.lora_B, second.coefficient)
    if refused("stacked round trip", second, fused_twice) or not second.comfortably_finite():
        return
    assert fused_twice.result is not None
    back_to_first = _unfused(implementation, "stacked round trip", fused_twice.result, second)
    if not implementation.exact_unfuse:
        assertions.assert_within_bound(
            back_to_first.detach().cpu(),
            snapshot.to(torch.float64),
            second.bound + _unfuse_bound(fused_twice.result, other, second.coefficient),
            what="[stacked round trip] unfusing the second adapter: the weight",
        )
        return
    assertions.assert_roundtrip(snapshot, back_to_first.detach().cpu(), max_ulps=0)
    original = _unfused(implementation, "stacked round trip", back_to_first, checked)
    assertions.assert_roundtrip(checked.original, original.detach().cpu(), max_ulps=0)
    row.observe(0.0)


def check_in_place_agreement(implementation: Implementation, checked: Checked, row: Row) -> None:
    """A returned tensor agrees with the weight written in place."""
    __tracebackhide__ = True
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if refused("in-place agreement", checked, call):
        return
    if not isinstance(call.returned, torch.Tensor) or not call.wrote_in_place:
        return
    if call.returned is checked.weight:
        return
    returned = call.returned.detach().cpu()
    written = checked.weight.detach().cpu()
    if (returned.shape, returned.dtype) != (written.shape, written.dtype):
        _fail(
            "in-place agreement",
            f"fuse wrote the weight in place and returned a tensor of another form "
            f"({tuple(returned.shape)} {returned.dtype})",
        )
    assertions.assert_unchanged(
        written,
        returned,
        what="[in-place agreement] the returned tensor (against the weight written in place)",
    )


def check_refused_atomically(implementation: Implementation, checked: Checked, row: Row) -> None:
    """:func:`check_refused` and :func:`check_atomic` on one call (for large weights)."""
    __tracebackhide__ = True
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    _assert_refused(checked, call)
    assertions.assert_atomic(checked.original, checked.weight.detach().cpu())
