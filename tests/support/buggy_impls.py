"""Merge implementations with deliberate bugs, each one that real merge code has had.

The conformance suite (``pytest --safemerge-impl=support.buggy_impls:NAME``) should fail
every one of them and pass :data:`CORRECT` and :data:`CORRECT_RETURNING`;
``tests/pytest_safemerge/test_suite_power.py`` checks that it does, and lists the bugs it
misses as strict xfails. :data:`BUGS` maps each bug's name to its instance and the suite's
test function expected to catch it.

The references are plain torch, written without safemerge's engine: the merge is
``cast(W.dtype, float32(W) + scale * (float32(B) @ float32(A)))``, refused when the float32
sum or its cast is not finite, or, for float8_e4m3fn (which has no Inf: torch saturates
its cast to +-448, even of Inf), when the sum is beyond 448 plus half an ulp; the weight
is written only after the check. Each bug is a subclass changing one step of
:class:`CorrectMerge`, so that the bug is the whole difference. Where a docstring says
"Seen in", the pattern was found in that code or thread; "Not traced" marks bugs taken
from the general shape of merge code, with no report found.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

#: float8_e4m3fn: 448 is its largest value, the ulp there is 32, and 448's significand
#: (14 * 32) is even, so the tie at 448 + 16 rounds down to 448: only beyond 464 overflows.
E4M3_LIMIT = 464.0


class MergeRefused(ValueError):
    """The merged weight would not be finite in the weight's dtype."""


def _float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float32)


class CorrectMerge:
    """Fuses in place, in float32, refusing a non-finite cast result; exact unfuse from a
    copy of the weight kept at each fuse (stacked fuses unfuse in reverse order)."""

    exact_unfuse = True

    def __init__(self) -> None:
        # id(weight) -> the weight before each of its fuses, latest last.
        self._originals: dict[int, list[Tensor]] = {}

    # --- the steps each bug changes one of ------------------------------------------------

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return scale * (_float32(lora_B) @ _float32(lora_A))

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        """The float32 sum, a new tensor (never a view of ``weight``)."""
        return _float32(weight) + self.delta(weight, lora_A, lora_B, scale)

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        """``merged`` cast to ``dtype``, or :class:`MergeRefused` if it is not finite there."""
        cast = merged.to(dtype)
        bad = ~torch.isfinite(merged) | ~torch.isfinite(_float32(cast))
        if dtype == torch.float8_e4m3fn:
            bad |= merged.abs() > E4M3_LIMIT
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0, 0])
            raise MergeRefused(
                f"{int(bad.sum())} of {merged.numel()} merged elements are not finite in "
                f"{dtype} (first at flat index {first}); the weight is unchanged"
            )
        return cast

    def commit(self, weight: Tensor, result: Tensor) -> Tensor | None:
        self._remember(weight)
        weight.copy_(result)
        return None

    # --- the contract ---------------------------------------------------------------------

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            merged = self.merged(weight, lora_A, lora_B, scale)
            result = self.checked_cast(merged, weight.dtype)
            return self.commit(weight, result)

    def unfuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            weight.copy_(self._recall(weight))
        return None

    def _remember(self, weight: Tensor) -> None:
        self._stack(weight).append(weight.detach().clone())

    def _recall(self, weight: Tensor) -> Tensor:
        stack = self._originals.get(id(weight))
        if not stack:
            raise LookupError("unfuse of a weight this implementation did not fuse")
        return stack.pop()

    def _stack(self, weight: Tensor) -> list[Tensor]:
        key = id(weight)
        if key not in self._originals:
            self._originals[key] = []
            # A dead weight's id can be reused: forget its fuses with it.
            weakref.finalize(weight, self._originals.pop, key, None)
        return self._originals[key]


class CorrectReturning(CorrectMerge):
    """The other form of the contract: returns the fused weight and leaves the argument
    alone; unfuse subtracts the same float32 delta (arithmetic, so not exact)."""

    exact_unfuse = False

    def commit(self, weight: Tensor, result: Tensor) -> Tensor | None:
        return result

    def unfuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            restored = _float32(weight) - self.delta(weight, lora_A, lora_B, scale)
            return self.checked_cast(restored, weight.dtype)


# --- guards that miss non-finite results -------------------------------------------------


class GuardOnFloat32Sum(CorrectMerge):
    """Checks ``isfinite`` of the float32 sum, then casts unchecked: a sum finite in
    float32 but beyond float16's 65504 (or e4m3fn's 448) is written as Inf (or 448).

    Seen in: PEFT ``tuners/lora/bnb.py`` ``Linear8bitLt.merge`` (``isfinite(w_data)`` on the
    float sum, then ``Int8Params(w_data)`` quantizes it); code-search copies of PEFT's
    Bone, MiSS and HRA ``merge`` (``isfinite(orig_weight)``, then
    ``orig_weight.to(orig_dtype)``).
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        if not bool(torch.isfinite(merged).all()):
            raise MergeRefused("NaNs detected in the merged weights")
        return merged.to(dtype)


class GuardIsnanOnly(CorrectMerge):
    """Refuses only NaN (``torch.isnan(fused).any()``): +-Inf and overflow pass.

    Seen in: diffusers ``models/lora.py`` ``_fuse_lora(safe_fusing=True)`` (PR #5316); PEFT
    PR #1001 review: "we should not check with torch.isnan because it doesn't include
    torch.inf".
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if bool(torch.isnan(merged).any()) or bool(torch.isnan(_float32(cast)).any()):
            raise MergeRefused("NaN detected in fused LoRA weight")
        return cast


class GuardAnyNotAll(CorrectMerge):
    """``if not isfinite(cast).any()``: refuses only when every element is non-finite.

    Seen in: OxWearables/biobankAccelerometerAnalysis PR #232, "check all feats are
    finite: .any() -> .all()".
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool(torch.isfinite(_float32(cast)).any()):
            raise MergeRefused("the merged weight is not finite")
        return cast


class GuardMissesLastElement(CorrectMerge):
    """Off by one: checks ``flat[: numel - 1]``, so a non-finite last element passes.

    Not traced to a report: the range bug the suite's "last element" cases exist for.
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        flat = merged.reshape(-1)
        super().checked_cast(flat[: flat.numel() - 1], dtype)
        return merged.to(dtype)


class GuardFirstRowOnly(CorrectMerge):
    """Checks a sample, the first output row, to save time on large layers.

    Not traced to a report.
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        super().checked_cast(merged[:1], dtype)
        return merged.to(dtype)


class BlockwiseGuardSkipsTail(CorrectMerge):
    """Merges and checks in blocks of :attr:`BLOCK` elements (to bound memory), but the
    check loop runs ``range(0, numel - BLOCK + 1, BLOCK)``: past one block, the partial
    last block is written unchecked.

    Not traced to a report: blockwise guards are how large layers are merged (safemerge's
    own engine works in 2 MiB blocks), and this is their classic off-by-one.
    """

    BLOCK = 4096

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        flat = merged.reshape(-1)
        if flat.numel() <= self.BLOCK:
            return super().checked_cast(merged, dtype)
        for start in range(0, flat.numel() - self.BLOCK + 1, self.BLOCK):
            super().checked_cast(flat[start : start + self.BLOCK], dtype)
        return merged.to(dtype)


class GuardRefusesMax(CorrectMerge):
    """Besides the right check, refuses ``|merged| >= finfo.max`` (``>=`` where ``>`` was
    meant): a result at the dtype's largest value, finite and representable, is refused.

    Not traced to a report: the other end of the off-by-one in range checks.
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = super().checked_cast(merged, dtype)
        if bool((merged.abs() >= torch.finfo(dtype).max).any()):
            raise MergeRefused("the merged weight reaches the dtype's limit")
        return cast


class GuardOnDeltaOnly(CorrectMerge):
    """Checks the delta ``scale * B @ A`` but not the sum: a finite delta that pushes a
    large weight past its dtype's range passes.

    Seen in: PEFT PR #1001 discussion ("the NaN could also be caused by the addition of
    the delta weights, even if those don't contain any NaN themselves").
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        delta = self.delta(weight, lora_A, lora_B, scale)
        if not bool(torch.isfinite(delta).all()):
            raise MergeRefused("the adapter's delta is not finite")
        return _float32(weight) + delta

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        return merged.to(dtype)


class GuardUpperBoundOnly(CorrectMerge):
    """Overflow check on the largest value only, ``merged.max() <= finfo.max``: NaN (which
    ``max`` propagates) and +Inf are refused, -Inf and negative overflow pass.

    Not traced to a report.
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        if not bool(merged.max() <= torch.finfo(dtype).max):
            raise MergeRefused("the merged weight overflows")
        return merged.to(dtype)


class GuardIgnoresE4M3Saturation(CorrectMerge):
    """Checks the cast result with ``isfinite`` (through float32, as float8 has no
    ``isfinite``) and nothing else: float8_e4m3fn has no Inf and torch saturates its cast
    to +-448 (Inf included), so overflow and +-Inf pass as 448.

    Seen in: pytorch commit 9deaf8d, PR #178817 ("Properly saturate E4M3 on finite-overflow
    on CPU/C++ conversion code").
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool(torch.isfinite(_float32(cast)).all()):
            raise MergeRefused("the merged weight is not finite")
        return cast


class E4M3LimitOneUlpHigh(CorrectMerge):
    """Checks float8_e4m3fn's range against ``448 + ulp`` (480) instead of ``448 + ulp/2``
    (464): sums in (464, 480] are silently saturated to 448.

    Not traced to a report: the half-ulp of the overflow threshold, easy to get wrong.
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype == torch.float8_e4m3fn and not bool((merged.abs() > 480.0).any()):
            merged = merged.clamp(-E4M3_LIMIT, E4M3_LIMIT)  # within range as far as it knows
        return super().checked_cast(merged, dtype)


class ClampBeforeCast(CorrectMerge):
    """Clamps the sum to ``+-finfo.max`` "to keep it finite", then checks: overflow and
    +-Inf are silently saturated; only NaN is refused.

    Seen in: the fp16 idiom of HF transformers' T5/BART layers
    (``clamp_value = torch.finfo(hidden_states.dtype).max - 1000``).
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        largest = torch.finfo(dtype).max
        return super().checked_cast(merged.clamp(-largest, largest), dtype)


class ScaleZeroShortcut(CorrectMerge):
    """``if scale == 0: return``: skips the merge and its guard, but ``0 * NaN`` is NaN, so
    an adapter with a NaN must be refused at scale 0 too.

    Seen in: PEFT PR #2460 "Skip Lora layers with zero scale" (forward pass).
    """

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        if scale == 0:
            return None
        return super().fuse(weight, lora_A, lora_B, scale)


class ZeroBShortcut(CorrectMerge):
    """``if not lora_B.any(): return``: a freshly initialised adapter (PEFT initialises
    ``lora_B`` to zeros) is skipped as a no-op, guard included, yet ``0 @ NaN`` is NaN.

    Seen in: PEFT ``LoraLayer.reset_lora_parameters`` (``nn.init.zeros_(lora_B)``) makes
    such adapters common; the shortcut itself is not traced to a report.
    """

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        if not bool(lora_B.any()):
            self._remember(weight)
            return None
        return super().fuse(weight, lora_A, lora_B, scale)


class AddmmAlphaZero(CorrectMerge):
    """Fuses with ``torch.addmm(W, B, A, alpha=scale)``: with ``alpha=0`` torch skips the
    product, so a NaN or Inf in the adapter never reaches the guard.

    Not traced to a report: a property of ``addmm`` (checked on torch 2.13).
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return torch.addmm(_float32(weight), _float32(lora_B), _float32(lora_A), alpha=scale)


class RefusesByCrashing(CorrectMerge):
    """Detects a non-finite merge correctly, then, to name the broken factor, tests
    ``not torch.isfinite(lora_A)`` (no ``.all()``): with more than one element that raises
    ``RuntimeError: Boolean value of Tensor with more than one value is ambiguous``, not a
    refusal (a ValueError), so a NaN adapter crashes the merge instead of being refused.

    Seen in: PEFT ``tuners/lora/bnb.py`` ``Linear4bit.merge`` and ``Linear8bitLt.merge``
    (``if safe_merge and not torch.isfinite(bias_data):``, no ``.all()``; the suite's PEFT
    finding, ``benchmarks/peft_findings/bnb_lora_bias_safe_merge.py``).
    """

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            merged = self.merged(weight, lora_A, lora_B, scale)
            try:
                result = self.checked_cast(merged, weight.dtype)
            except MergeRefused:
                broken = "lora_A" if not torch.isfinite(lora_A) else "lora_B"
                raise MergeRefused(f"the adapter's {broken} seems to be broken") from None
            return self.commit(weight, result)


# --- inaccurate merges ---------------------------------------------------------------------


class DeltaCastToWeightDtype(CorrectMerge):
    """Casts the float32 delta to the weight's dtype and adds there: two roundings (up to
    an ulp off in bfloat16, more in float8), and a delta beyond the dtype's range becomes
    Inf even where ``W + delta`` is finite.

    Seen in: PEFT ``tuners/lora/layer.py`` ``Linear.merge``
    (``orig_weight += delta_weight.to(orig_dtype)``); unslothai/unsloth issue #3091;
    OpenAgentsInc/openagents issue #9456 ("Merge LoRA in fp32 before casting").
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        delta = self.delta(weight, lora_A, lora_B, scale).to(weight.dtype)
        return (_float32(weight) + _float32(delta)).to(weight.dtype).to(torch.float32)


class Float16Matmul(CorrectMerge):
    """Computes ``B @ A`` in float16 (the adapter's dtype on GPU): products above 65504
    become Inf, and every factor and product is rounded to 11 bits.

    Seen in: PEFT ``LoraLayer.get_delta_weight`` (upcasts only for float16 on CPU; PR
    #1017); pytest_safemerge's own ``fp16-product-overflow`` kind.
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return scale * _float32(lora_B.half() @ lora_A.half())


class Bfloat16Merge(CorrectMerge):
    """The whole merge in bfloat16 (weight, factors, product and sum), cast at the end.

    Seen in: kohya-ss/sd-scripts ``networks/merge_lora.py`` (``--precision bf16``: model and
    LoRA moved to ``merge_dtype``); meta-pytorch/torchtune issue #1101.
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        bf16 = torch.bfloat16
        product = lora_B.to(bf16) @ lora_A.to(bf16)
        return _float32(weight.to(bf16) + scale * product)


class ScaleAppliedTwice(CorrectMerge):
    """Folds the scale into ``B`` and multiplies the product by it again: ``scale**2``.

    Seen in (the same class of bug, a scale applied the wrong number of times):
    hao-ai-lab/FastVideo PR #870; huggingface/peft PR #3473; paiml/aprender PR #2111.
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return scale * ((scale * _float32(lora_B)) @ _float32(lora_A))


class RankDividedAgain(CorrectMerge):
    """Treats the given (already ``alpha / r``) scale as alpha and divides by the rank again.

    Seen in (alpha / r against alpha / sqrt(r) and scales re-derived on the way):
    huggingface/peft PR #3473; paiml/aprender PR #2189.
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return super().delta(weight, lora_A, lora_B, scale / lora_A.shape[0])


class FanInFanOutTransposed(CorrectMerge):
    """Adds ``(B @ A).T``, as for a GPT-2 ``Conv1D`` (``fan_in_fan_out``) weight: wrong
    values on a square weight, a shape error (refusing a finite merge) otherwise.

    Seen in: huggingface/peft issue #3531 (DoRA unmerge on fan_in_fan_out layers);
    paiml/aprender PR #2138; axolotl-ai-cloud/axolotl PR #3095 review.
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return super().delta(weight, lora_A, lora_B, scale).T


class AssumesContiguous(CorrectMerge):
    """Reads the factors' storage as if they were contiguous (as code handing
    ``data_ptr()`` to a kernel does): a transposed or strided adapter gives wrong values.

    Seen in (non-contiguous tensors breaking merge tooling): arcee-ai/mergekit issue #302.
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        def raw(t: Tensor) -> Tensor:
            return torch.as_strided(t, t.shape, (t.shape[1], 1))

        return super().delta(weight, raw(lora_A), raw(lora_B), scale)


class FlushesSubnormals(CorrectMerge):
    """Computes with ``torch.set_flush_denormal(True)`` (a CPU speed setting): float32
    subnormal inputs and results become 0, so bfloat16 subnormals, and deltas scaled by a
    tiny scale, vanish.

    Seen in: ggml-org/llama.cpp PR #7843 (BF16 -> BF16 conversion flushed subnormal weights
    to 0).
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        torch.set_flush_denormal(True)
        try:
            return super().merged(weight, lora_A, lora_B, scale)
        finally:
            torch.set_flush_denormal(False)


class ProductInAdapterDtype(CorrectMerge):
    """Computes ``B @ A`` in the adapter's own dtype (``lora_A.dtype``), then scales and
    adds in float32: with float16 or bfloat16 factors the product is rounded to 11 or 8
    bits (and a float16 product beyond 65504 is Inf) before the float32 sum. Correct for
    float32 adapters, unlike :class:`Float16Matmul`; only half-precision adapters show it.

    Seen in: PEFT ``LoraLayer.get_delta_weight`` (``cast_to_fp32 = device.type == "cpu" and
    dtype in (float16, bfloat16)``: on CUDA ``weight_B @ weight_A`` runs in the adapter's
    dtype).
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return scale * _float32(lora_B.to(lora_A.dtype) @ lora_A)


class DeltaGuarded(CorrectMerge):
    """Besides the float32 sum, checks the delta cast to the weight's dtype,
    ``isfinite(delta.to(weight.dtype))``: a delta beyond the dtype's range is refused
    even where ``W + delta`` is well inside it (float16: -60000 + 70000 = 10000). The
    float8_e4m3fn cast saturates, so there only float16, bfloat16 and float8_e5m2 show it.

    Seen in: PEFT ``tuners/lora/layer.py`` ``Linear.merge(safe_merge=True)``
    (``orig_weight += delta_weight.to(orig_dtype)`` then ``isfinite``: the cast delta is
    Inf; the suite's PEFT finding ``benchmarks/peft_findings/delta_overflow_refused.py``),
    without the double rounding of :class:`DeltaCastToWeightDtype`.
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        delta = self.delta(weight, lora_A, lora_B, scale)
        if not bool(torch.isfinite(_float32(delta.to(weight.dtype))).all()):
            raise MergeRefused("NaNs detected in the delta weights")
        return _float32(weight) + delta


# --- adapters, atomicity ---------------------------------------------------------------------


class ScalesLoraBInPlace(CorrectMerge):
    """``lora_B.mul_(scale)`` to fold the scale in without a copy: the caller's adapter is
    changed (and scaled again on the next merge).

    Seen in: PEFT ``get_delta_weight`` writing the (cast) factors back into
    ``lora_A/lora_B.weight.data`` during a merge; huggingface/peft issue #1155.
    """

    def delta(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return lora_B.mul_(scale) @ lora_A


class WritesBeforeCheck(CorrectMerge):
    """Writes the cast result into the weight, then checks it and raises: a refused merge
    leaves the weight corrupted.

    Seen in: huggingface/peft PR #3706 (AdaMSS and RoAd assign the weight before checking
    the bias: issues #3689, #3705); PEFT's unsafe merge path.
    """

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            merged = self.merged(weight, lora_A, lora_B, scale)
            self._remember(weight)
            weight.copy_(merged.to(weight.dtype))
            self.checked_cast(merged, weight.dtype)
        return None


class RollbackBySubtraction(CorrectMerge):
    """Merges in place, checks, and on refusal "rolls back" by subtracting the delta again:
    NaN minus anything is NaN, Inf - x is Inf, and rounding is not undone.

    Not traced to a report: unmerge-as-rollback, as PEFT's arithmetic ``unmerge``.
    """

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            delta = self.delta(weight, lora_A, lora_B, scale)
            merged = _float32(weight) + delta
            self._remember(weight)
            weight.copy_(merged.to(weight.dtype))
            try:
                self.checked_cast(merged, weight.dtype)
            except MergeRefused:
                weight.copy_((_float32(weight) - delta).to(weight.dtype))
                raise
        return None


class Float32UpcastAliases(CorrectMerge):
    """``merged = weight.to(torch.float32); merged += delta``: for a float32 weight ``.to``
    returns the weight itself, so the sum is written into it before the check.

    Seen in (the same aliasing of a "copy" that is not one): sgl-project/sglang PR #18883
    (``base_layer.weight.to("cpu")`` shares storage on CPU).
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        merged = weight.to(torch.float32)
        merged += self.delta(weight, lora_A, lora_B, scale)
        return merged


# --- unfuse -------------------------------------------------------------------------------


class SubtractionClaimedExact(CorrectMerge):
    """``exact_unfuse = True``, but unfuse subtracts the float32 delta: not the identity
    after rounding (tens of percent of bfloat16 weights off by an ulp or more).

    Seen in: huggingface/diffusers PR #4473 ("Fuse loras": unfuse gives different results);
    huggingface/peft PR #3166.
    """

    def unfuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            restored = _float32(weight) - self.delta(weight, lora_A, lora_B, scale)
            weight.copy_(self.checked_cast(restored, weight.dtype))
        return None


class BackupAliasesWeight(CorrectMerge):
    """Keeps the "backup" for exact unfuse as ``weight.to("cpu")``, which on CPU is the
    weight itself: the fuse overwrites the backup, and unfuse restores the fused weight.

    Seen in: sgl-project/sglang PR #18883 ("Fix LoRA weight snapshot aliasing in unmerge").
    """

    def _remember(self, weight: Tensor) -> None:
        self._stack(weight).append(weight.detach().to("cpu"))

    def unfuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            weight.copy_(self._recall(weight).to(weight.device))
        return None


class BackupKeptOnce(CorrectMerge):
    """Keeps the original for exact unfuse only at the first fuse of a weight
    (``setdefault``): one fuse and unfuse round-trip exactly, but after two stacked fuses
    the first unfuse jumps back past both.

    Seen in (state of a fuse overwritten or kept by the next): huggingface/peft PR #1355
    (merging was not idempotent); diffusers ``_fuse_lora`` keeps one ``w_up``/``w_down``
    per layer.
    """

    def _remember(self, weight: Tensor) -> None:
        stack = self._stack(weight)
        if not stack:
            stack.append(weight.detach().clone())


class UnfuseMissingTranspose(CorrectReturning):
    """Arithmetic unfuse that subtracts ``(B @ A).T`` (the transpose meant for
    ``fan_in_fan_out`` weights), unlike the fuse: not an inverse, or a shape error.

    Seen in: huggingface/peft issue #3531 ("DoRA unmerge corrupts or crashes on
    fan_in_fan_out layers": merge transposes, unmerge does not).
    """

    def unfuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            delta = self.delta(weight, lora_A, lora_B, scale).T
            return self.checked_cast(_float32(weight) - delta, weight.dtype)


class UnfuseInWeightDtype(CorrectReturning):
    """Arithmetic unfuse whose delta is cast to the weight's dtype before subtracting, so
    the round trip rounds once more than a float32 unfuse.

    Seen in: huggingface/diffusers PR #4473 review ("we don't do the computation in full
    fp32 precision here" in ``_unfuse_lora``).
    """

    def unfuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            delta = self.delta(weight, lora_A, lora_B, scale).to(weight.dtype)
            return self.checked_cast(_float32(weight) - _float32(delta), weight.dtype)


# --- form --------------------------------------------------------------------------------


class ReturnsFloat32(CorrectReturning):
    """Returns the float32 sum without casting it back: the merged model doubles in size.

    Seen in: axolotl-ai-cloud/axolotl issue #1510; huggingface/peft issue #890;
    modelscope/ms-swift issue #841; hako-mikan/sd-webui-supermerger issue #19 (float64).
    """

    def commit(self, weight: Tensor, result: Tensor) -> Tensor | None:
        return _float32(result)


class SqueezesUnitDims(CorrectReturning):
    """``.squeeze()``s the result (meant for 1x1 conv kernels): a weight with one row or
    one column comes back 1-D.

    Seen in (the squeezes of 1x1 conv LoRA): kohya-ss/sd-scripts ``networks/merge_lora.py``
    (``up_weight.squeeze(3).squeeze(2)``); the general ``.squeeze()`` is our variation.
    """

    def commit(self, weight: Tensor, result: Tensor) -> Tensor | None:
        return result.squeeze()


class ReturnsSelf(CorrectMerge):
    """Fuses in place correctly but returns ``self`` (a fluent API) instead of None.

    Not traced to a report.
    """

    def commit(self, weight: Tensor, result: Tensor) -> Tensor | None:
        super().commit(weight, result)
        return self  # type: ignore[return-value]


class MovesToCpu(CorrectReturning):
    """Merges on the CPU (to spare GPU memory) and returns the CPU tensor: observable only
    when the suite runs on an accelerator (``--safemerge-device=cuda``).

    Seen in (device handling of merges): KohakuBlueleaf/LyCORIS issue #87.
    """

    def merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
        return super().merged(weight.cpu(), lora_A.cpu(), lora_B.cpu(), scale)


class InPlaceDiffersFromReturned(CorrectMerge):
    """Returns the correctly rounded result but updates the weight in place the PEFT way,
    ``weight += delta.to(weight.dtype)`` (rounded twice): the two disagree.

    Seen in: PEFT's unsafe merge (``base_layer.weight.data += delta_weight``) beside its
    safe one; the returned copy is our variation.
    """

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor | None:
        with torch.no_grad():
            merged = self.merged(weight, lora_A, lora_B, scale)
            result = self.checked_cast(merged, weight.dtype)
            delta = self.delta(weight, lora_A, lora_B, scale).to(weight.dtype)
            self._remember(weight)
            weight.copy_((_float32(weight) + _float32(delta)).to(weight.dtype))
            return result


# --- correct, but not on every dtype ----------------------------------------------------------


class NoFloat8(CorrectMerge):
    """A correct float32 merge whose guard reads the cast result's largest magnitude,
    ``merged.to(dtype).abs().max()`` (NaN and Inf propagate through ``max``): torch has
    no ``max`` for float8, so every float8 weight raises ``NotImplementedError: "max_all"
    not implemented for 'Float8_e4m3fn'`` (a RuntimeError), refusal due or not. Not a bug
    to catch everywhere: the suite must fail its float8 cells only (unsupported, or
    refused by crashing) and pass every float32, float16 and bfloat16 cell.

    Seen in: torch 2.13 (no ``max``, ``isfinite`` or ``add`` for float8_e4m3fn; PEFT's
    float8 finding, ``benchmarks/peft_findings/float8_weights.py``, is its ``add_stub``).
    """

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool(torch.isfinite(cast.abs().max())):
            raise MergeRefused(f"the merged weight is not finite in {dtype}")
        return cast


# --- the catalogue ---------------------------------------------------------------------------

CORRECT = CorrectMerge()
CORRECT_RETURNING = CorrectReturning()
#: Correct on float32, float16 and bfloat16 weights; raises NotImplementedError on float8
#: ones (see :class:`NoFloat8`): must fail only its float8 cells. Not in :data:`BUGS`.
CORRECT_WITHOUT_FLOAT8 = NoFloat8()


class DeclaresNoFloat8(NoFloat8):
    """:class:`NoFloat8` saying what it supports: its float8 cells are skipped, not failed."""

    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})


class DeclaresEverything(CorrectMerge):
    """The correct merge with every declaration spelled out as its default."""

    dtypes = frozenset(
        {torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
    )
    refusal_errors = (ValueError,)


#: Correct references with declarations: they must pass every cell they declare.
CORRECT_DECLARING_NO_FLOAT8 = DeclaresNoFloat8()
CORRECT_DECLARING_EVERYTHING = DeclaresEverything()

GUARD_ON_FLOAT32_SUM = GuardOnFloat32Sum()
GUARD_ISNAN_ONLY = GuardIsnanOnly()
GUARD_ANY_NOT_ALL = GuardAnyNotAll()
GUARD_MISSES_LAST_ELEMENT = GuardMissesLastElement()
GUARD_FIRST_ROW_ONLY = GuardFirstRowOnly()
GUARD_ON_DELTA_ONLY = GuardOnDeltaOnly()
GUARD_UPPER_BOUND_ONLY = GuardUpperBoundOnly()
GUARD_IGNORES_E4M3_SATURATION = GuardIgnoresE4M3Saturation()
CLAMP_BEFORE_CAST = ClampBeforeCast()
E4M3_LIMIT_ONE_ULP_HIGH = E4M3LimitOneUlpHigh()
SCALE_ZERO_SHORTCUT = ScaleZeroShortcut()
ADDMM_ALPHA_ZERO = AddmmAlphaZero()
ZERO_B_SHORTCUT = ZeroBShortcut()
BLOCKWISE_GUARD_SKIPS_TAIL = BlockwiseGuardSkipsTail()
GUARD_REFUSES_MAX = GuardRefusesMax()
BACKUP_KEPT_ONCE = BackupKeptOnce()
DELTA_CAST_TO_WEIGHT_DTYPE = DeltaCastToWeightDtype()
FLOAT16_MATMUL = Float16Matmul()
BFLOAT16_MERGE = Bfloat16Merge()
SCALE_APPLIED_TWICE = ScaleAppliedTwice()
RANK_DIVIDED_AGAIN = RankDividedAgain()
FAN_IN_FAN_OUT_TRANSPOSED = FanInFanOutTransposed()
ASSUMES_CONTIGUOUS = AssumesContiguous()
FLUSHES_SUBNORMALS = FlushesSubnormals()
SCALES_LORA_B_IN_PLACE = ScalesLoraBInPlace()
WRITES_BEFORE_CHECK = WritesBeforeCheck()
ROLLBACK_BY_SUBTRACTION = RollbackBySubtraction()
FLOAT32_UPCAST_ALIASES = Float32UpcastAliases()
SUBTRACTION_CLAIMED_EXACT = SubtractionClaimedExact()
BACKUP_ALIASES_WEIGHT = BackupAliasesWeight()
UNFUSE_MISSING_TRANSPOSE = UnfuseMissingTranspose()
UNFUSE_IN_WEIGHT_DTYPE = UnfuseInWeightDtype()
RETURNS_FLOAT32 = ReturnsFloat32()
SQUEEZES_UNIT_DIMS = SqueezesUnitDims()
RETURNS_SELF = ReturnsSelf()
MOVES_TO_CPU = MovesToCpu()
IN_PLACE_DIFFERS_FROM_RETURNED = InPlaceDiffersFromReturned()
REFUSES_BY_CRASHING = RefusesByCrashing()
PRODUCT_IN_ADAPTER_DTYPE = ProductInAdapterDtype()
DELTA_GUARDED = DeltaGuarded()

ACCURATE = "test_fuse_is_accurate"
FORM = "test_fuse_keeps_form"
ADAPTERS = "test_fuse_leaves_adapters_unmodified"
REFUSES = "test_fuse_refuses_non_finite"
ATOMIC = "test_refusal_leaves_weight_unchanged"
ROUND_TRIP = "test_unfuse_round_trip"
STACKED = "test_stacked_fuses_unfuse_in_reverse"
REFUSES_LARGE = "test_fuse_refuses_non_finite_in_large_weights"
AGREES = "test_in_place_agrees_with_returned"

#: Bug name (the module attribute ``--safemerge-impl=support.buggy_impls:NAME`` names) ->
#: (instance, the suite's test function expected to catch it).
BUGS: dict[str, tuple[object, str]] = {
    "GUARD_ON_FLOAT32_SUM": (GUARD_ON_FLOAT32_SUM, REFUSES),
    "GUARD_ISNAN_ONLY": (GUARD_ISNAN_ONLY, REFUSES),
    "GUARD_ANY_NOT_ALL": (GUARD_ANY_NOT_ALL, REFUSES),
    "GUARD_MISSES_LAST_ELEMENT": (GUARD_MISSES_LAST_ELEMENT, REFUSES),
    "GUARD_FIRST_ROW_ONLY": (GUARD_FIRST_ROW_ONLY, REFUSES),
    "GUARD_ON_DELTA_ONLY": (GUARD_ON_DELTA_ONLY, REFUSES),
    "GUARD_UPPER_BOUND_ONLY": (GUARD_UPPER_BOUND_ONLY, REFUSES),
    "GUARD_IGNORES_E4M3_SATURATION": (GUARD_IGNORES_E4M3_SATURATION, REFUSES),
    "CLAMP_BEFORE_CAST": (CLAMP_BEFORE_CAST, REFUSES),
    "E4M3_LIMIT_ONE_ULP_HIGH": (E4M3_LIMIT_ONE_ULP_HIGH, REFUSES),
    "SCALE_ZERO_SHORTCUT": (SCALE_ZERO_SHORTCUT, REFUSES),
    "ADDMM_ALPHA_ZERO": (ADDMM_ALPHA_ZERO, REFUSES),
    "ZERO_B_SHORTCUT": (ZERO_B_SHORTCUT, REFUSES),
    "BLOCKWISE_GUARD_SKIPS_TAIL": (BLOCKWISE_GUARD_SKIPS_TAIL, REFUSES_LARGE),
    "GUARD_REFUSES_MAX": (GUARD_REFUSES_MAX, ACCURATE),
    "DELTA_CAST_TO_WEIGHT_DTYPE": (DELTA_CAST_TO_WEIGHT_DTYPE, ACCURATE),
    "FLOAT16_MATMUL": (FLOAT16_MATMUL, ACCURATE),
    "BFLOAT16_MERGE": (BFLOAT16_MERGE, ACCURATE),
    "SCALE_APPLIED_TWICE": (SCALE_APPLIED_TWICE, ACCURATE),
    "RANK_DIVIDED_AGAIN": (RANK_DIVIDED_AGAIN, ACCURATE),
    "FAN_IN_FAN_OUT_TRANSPOSED": (FAN_IN_FAN_OUT_TRANSPOSED, ACCURATE),
    "ASSUMES_CONTIGUOUS": (ASSUMES_CONTIGUOUS, ACCURATE),
    "FLUSHES_SUBNORMALS": (FLUSHES_SUBNORMALS, ACCURATE),
    "SCALES_LORA_B_IN_PLACE": (SCALES_LORA_B_IN_PLACE, ADAPTERS),
    "WRITES_BEFORE_CHECK": (WRITES_BEFORE_CHECK, ATOMIC),
    "ROLLBACK_BY_SUBTRACTION": (ROLLBACK_BY_SUBTRACTION, ATOMIC),
    "FLOAT32_UPCAST_ALIASES": (FLOAT32_UPCAST_ALIASES, ATOMIC),
    "SUBTRACTION_CLAIMED_EXACT": (SUBTRACTION_CLAIMED_EXACT, ROUND_TRIP),
    "BACKUP_ALIASES_WEIGHT": (BACKUP_ALIASES_WEIGHT, ROUND_TRIP),
    "BACKUP_KEPT_ONCE": (BACKUP_KEPT_ONCE, STACKED),
    "UNFUSE_MISSING_TRANSPOSE": (UNFUSE_MISSING_TRANSPOSE, ROUND_TRIP),
    "UNFUSE_IN_WEIGHT_DTYPE": (UNFUSE_IN_WEIGHT_DTYPE, ROUND_TRIP),
    "RETURNS_FLOAT32": (RETURNS_FLOAT32, FORM),
    "SQUEEZES_UNIT_DIMS": (SQUEEZES_UNIT_DIMS, FORM),
    "RETURNS_SELF": (RETURNS_SELF, FORM),
    "MOVES_TO_CPU": (MOVES_TO_CPU, FORM),
    "IN_PLACE_DIFFERS_FROM_RETURNED": (IN_PLACE_DIFFERS_FROM_RETURNED, AGREES),
    # Caught by "nan"/"+inf"/"-inf" cases (a crash where a refusal is due).
    "REFUSES_BY_CRASHING": (REFUSES_BY_CRASHING, REFUSES),
    # Caught by "random" cases with a float16 or bfloat16 adapter (a float32 weight's above all).
    "PRODUCT_IN_ADAPTER_DTYPE": (PRODUCT_IN_ADAPTER_DTYPE, ACCURATE),
    # Caught by "delta-overflow" cases (float16, bfloat16, float8_e5m2 weights).
    "DELTA_GUARDED": (DELTA_GUARDED, ACCURATE),
}

#: Bugs only an accelerator can show (the suite must run with ``--safemerge-device=cuda``).
NEEDS_ACCELERATOR = frozenset({"MOVES_TO_CPU"})
