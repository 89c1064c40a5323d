"""Assertions for merge code, with torch.testing-style reports and tolerances from the arithmetic.

Each reports how many elements broke the property, the worst one (index, values, how
far over its bound) and hides its own frame from tracebacks.
"""

from __future__ import annotations

import torch

import safemerge

__all__ = [
    "assert_atomic",
    "assert_fused_close",
    "assert_roundtrip",
    "assert_unchanged",
    "assert_within_bound",
    "assert_within_quant_bound",
]


def assert_within_bound(
    actual: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, *, what: str = "result"
) -> None:
    """Every ``|actual - reference|`` is within its own ``bound`` (NaN never is)."""
    __tracebackhide__ = True
    error = (actual.detach().to(torch.float64) - reference.to(torch.float64)).abs()
    bound = bound.to(torch.float64)
    outside = ~(error <= bound)
    if not bool(outside.any()):
        return
    ratio = torch.where(torch.isnan(error), torch.full_like(error, float("inf")), error / bound)
    worst = int(ratio.reshape(-1).argmax())
    index = safemerge.numerics.unravel(worst, tuple(actual.shape))
    count, total = int(outside.sum()), actual.numel()
    raise AssertionError(
        f"{what} is not within its error bound.\n"
        f"Mismatched elements: {count} / {total} ({100.0 * count / max(total, 1):.1f}%)\n"
        f"Greatest error as a fraction of its bound: {float(ratio.reshape(-1)[worst]):.3g} at index "
        f"{index} (actual {float(actual.detach().reshape(-1)[worst].float()):.9g}, expected "
        f"{float(reference.reshape(-1)[worst]):.9g}, bound {float(bound.reshape(-1)[worst]):.3g})"
    )


def assert_fused_close(
    fused: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    what: str = "the fused weight",
) -> None:
    """``fused`` is ``weight + scale * lora_B @ lora_A`` (an ``(out, in)`` weight) within the
    forward error bound of a float32 merge and the final cast to ``weight.dtype``."""
    __tracebackhide__ = True
    if fused.shape != weight.shape or fused.dtype != weight.dtype:
        raise AssertionError(
            f"{what} changed form: shape {tuple(fused.shape)} dtype {fused.dtype}, "
            f"expected shape {tuple(weight.shape)} dtype {weight.dtype}"
        )
    reference, bound = safemerge.merge_bound(weight, [(lora_B, lora_A, scale)], weight.dtype)
    assert_within_bound(fused, reference, bound, what=what)


def assert_within_quant_bound(
    layer: object,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> None:
    """A bitsandbytes layer (``Linear4bit``, ``Linear8bitLt``) holds the quantization of
    ``weight + scale * lora_B @ lora_A`` (``weight``: the float32 values the layer held
    before the merge, ``(out, in)``), element by element within its block's bound.

    ``|values - exact| <= |values - y| + |y - exact|`` with ``y`` the float32 merge: the
    quantizer's bound of ``y``'s block (``safemerge.quantization_bound``) plus the float32
    merge's own bound, counted twice, since it also moves the block absmax the quantizer's
    bound scales with (by at most that much, times a half-gap below 1).
    """
    __tracebackhide__ = True
    exact, merge = safemerge.merge_bound(
        weight.detach().float().cpu(), [(lora_B, lora_A, scale)], torch.float32
    )
    values, quantization = safemerge.quantization_bound(layer, exact.float())
    bound = quantization.cpu().to(torch.float64) + 2 * merge
    assert_within_bound(values.cpu(), exact, bound, what="the quantized weight")


def assert_roundtrip(original: torch.Tensor, restored: torch.Tensor, *, max_ulps: int = 0) -> None:
    """``restored`` is ``original`` to the bit (``max_ulps=0``) or within ``max_ulps`` ulps."""
    __tracebackhide__ = True
    _assert_same_form(original, restored, "restored")
    steps = (
        safemerge.numerics.ordered_bits(restored.detach())
        - safemerge.numerics.ordered_bits(original.detach())
    ).abs()
    off = steps > max_ulps
    if not bool(off.any()):
        return
    worst = int(steps.reshape(-1).argmax())
    count, total = int(off.sum()), original.numel()
    raise AssertionError(
        f"the round trip did not restore the weight{' exactly' if max_ulps == 0 else f' within {max_ulps} ulps'}.\n"
        f"Changed elements: {count} / {total} ({100.0 * count / max(total, 1):.1f}%)\n"
        f"Greatest change: {int(steps.reshape(-1)[worst])} ulps at index {safemerge.numerics.unravel(worst, tuple(original.shape))} "
        f"(original {float(original.detach().reshape(-1)[worst].float()):.9g}, restored "
        f"{float(restored.detach().reshape(-1)[worst].float()):.9g})"
    )


def assert_atomic(before: torch.Tensor, after: torch.Tensor) -> None:
    """A refused merge left the weight bit-identical (NaN payloads and -0.0 included)."""
    __tracebackhide__ = True
    assert_unchanged(
        before,
        after,
        what="the weight",
        why="although the merge was refused (write before check?)",
    )


def assert_unchanged(
    before: torch.Tensor, after: torch.Tensor, *, what: str = "the tensor", why: str = ""
) -> None:
    """``after`` holds every bit of ``before`` (NaN payloads and -0.0 included)."""
    __tracebackhide__ = True
    _assert_same_form(before, after, what)
    old = safemerge.numerics.int_view(before.detach().contiguous())
    new = safemerge.numerics.int_view(after.detach().contiguous())
    changed = old != new
    if bool(changed.any()):
        first = int(changed.reshape(-1).nonzero()[0, 0])
        index = safemerge.numerics.unravel(first, tuple(before.shape))
        raise AssertionError(
            f"{what} changed{' ' + why if why else ''}.\n"
            f"Changed elements: {int(changed.sum())} / {before.numel()}; first at index "
            f"{index} (before {float(before.detach().reshape(-1)[first].float()):.9g}, after "
            f"{float(after.detach().reshape(-1)[first].float()):.9g})"
        )


def _assert_same_form(expected: torch.Tensor, actual: torch.Tensor, what: str) -> None:
    __tracebackhide__ = True
    if (actual.shape, actual.dtype, actual.device) != (
        expected.shape,
        expected.dtype,
        expected.device,
    ):
        raise AssertionError(
            f"{what} has shape {tuple(actual.shape)}, dtype {actual.dtype}, device {actual.device}; "
            f"expected {tuple(expected.shape)}, {expected.dtype}, {expected.device}"
        )
