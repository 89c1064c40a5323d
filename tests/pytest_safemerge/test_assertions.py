"""The plugin's assertions: they pass correct merges and report broken ones precisely."""

from __future__ import annotations

import pytest
import torch

import safemerge
from pytest_safemerge.assertions import (
    assert_atomic,
    assert_fused_close,
    assert_roundtrip,
    assert_within_bound,
    assert_within_quant_bound,
)


def _case(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(48, 40, generator=generator) * 0.05).to(dtype)
    lora_A = torch.randn(4, 40, generator=generator) * 0.2
    lora_B = torch.randn(48, 4, generator=generator) * 0.2
    return weight, lora_A, lora_B


def test_a_correct_fuse_passes() -> None:
    weight, lora_A, lora_B = _case()
    fused = weight.clone()
    safemerge.fuse_weight(fused, safemerge.LoraAdapter(lora_A, lora_B), scale=0.5)
    assert_fused_close(fused, weight, lora_A, lora_B, 0.5)


def test_a_merge_computed_in_low_precision_is_caught_with_its_worst_element() -> None:
    weight, lora_A, lora_B = _case(torch.float16)
    sloppy = weight + (0.5 * lora_B.half() @ lora_A.half())  # float16 compute, not float32
    with pytest.raises(AssertionError) as caught:
        assert_fused_close(sloppy, weight, lora_A, lora_B, 0.5)
    message = str(caught.value)
    assert "the fused weight is not within its error bound" in message
    assert "Mismatched elements:" in message and "/ 1920" in message
    assert "Greatest error as a fraction of its bound:" in message and "at index (" in message


def test_a_wrong_scale_and_a_changed_form_are_caught() -> None:
    weight, lora_A, lora_B = _case(torch.float32)
    doubled = weight + lora_B @ lora_A  # scale 1.0 applied where 0.5 was asked
    with pytest.raises(AssertionError, match="not within its error bound"):
        assert_fused_close(doubled, weight, lora_A, lora_B, 0.5)
    with pytest.raises(AssertionError, match="changed form"):
        assert_fused_close(doubled.double(), weight, lora_A, lora_B, 1.0)


def test_roundtrip_counts_ulps() -> None:
    weight, _, _ = _case()
    nudged = weight.clone()
    bits = safemerge.numerics.int_view(nudged)
    bits[3, 7] += 1
    assert_roundtrip(weight, weight.clone())
    assert_roundtrip(weight, nudged, max_ulps=1)
    with pytest.raises(
        AssertionError, match=r"(?s)Changed elements: 1 / 1920.*1 ulps at index \(3, 7\)"
    ):
        assert_roundtrip(weight, nudged)


def test_atomic_sees_signed_zero_and_nan_payloads() -> None:
    before = torch.tensor([0.0, float("nan"), 1.0])
    after = before.clone()
    after[0] = -0.0
    with pytest.raises(AssertionError, match=r"Changed elements: 1 / 3; first at index \(0,\)"):
        assert_atomic(before, after)
    assert_atomic(before, before.clone())


def test_nan_is_never_within_a_bound() -> None:
    with pytest.raises(AssertionError, match="inf at index"):
        assert_within_bound(
            torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]), torch.ones(2)
        )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_assert_within_quant_bound_accepts_a_fuse_and_catches_a_lost_delta(
    quant_type: str,
) -> None:
    from safemerge import synthetic

    base = synthetic.random_layer("linear", 128, 24, seed=1)
    layer = synthetic.quantized_linear(base.weight, quant_type, blocksize=64)
    before, _ = safemerge.quantization_bound(layer, base.weight.detach())
    adapter = synthetic.random_adapter(layer, rank=4, std=0.5, seed=2)
    safemerge.fuse(layer, adapter, scale=1.0)
    args = (layer, before, adapter.lora_A, adapter.lora_B, adapter.scale)
    assert_within_quant_bound(*args)
    # A merge that lost the adapter (say, a requantize of the old weight) is caught.
    with pytest.raises(AssertionError, match="the quantized weight is not within its error bound"):
        assert_within_quant_bound(layer, before, adapter.lora_A, adapter.lora_B, 3.0)
