"""Which layers fuse, how their weights are seen, and how the others are refused."""

from __future__ import annotations

import copy
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from safemerge import (
    AdapterConfigError,
    LoraAdapter,
    NonFiniteMergeError,
    UnsupportedLayerError,
    fuse,
)
from safemerge.layer import fuse_in_buffer, fused_tensors
from safemerge.merge import engine
from safemerge.merge.blocks import Blocks
from safemerge.merge.view import view_layer


class TransposedLinear(nn.Module):
    """GPT-2's Conv1D: y = x @ W + b with W stored (in, out)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))


@pytest.mark.parametrize(
    ("layer", "kind", "matrix_shape", "transposed"),
    [
        (nn.Linear(5, 3), "linear", (3, 5), False),
        (nn.Embedding(7, 4), "embedding", (7, 4), True),
        (nn.Conv1d(2, 6, 3), "conv1d", (6, 6), False),
        (nn.Conv2d(2, 6, (1, 3)), "conv2d", (6, 6), False),
        (nn.Conv3d(2, 6, 1), "conv3d", (6, 2), False),
        (TransposedLinear(5, 3), "fan_in_fan_out", (5, 3), True),
    ],
)
def test_each_kind_is_one_matrix(
    layer: nn.Module, kind: str, matrix_shape: tuple[int, int], transposed: bool
) -> None:
    view = view_layer(layer, "x")
    assert (view.kind, view.matrix_shape, view.transposed) == (kind, matrix_shape, transposed)


def test_delta_factors_land_in_the_weight_layout() -> None:
    generator = torch.Generator().manual_seed(0)
    lora_A, lora_B = torch.randn(2, 5, generator=generator), torch.randn(3, 2, generator=generator)
    linear_delta = lora_B @ lora_A
    for layer, expected in (
        (nn.Linear(5, 3), linear_delta),
        (TransposedLinear(5, 3), linear_delta.T),
        (nn.Embedding(5, 3), linear_delta.T),
    ):
        adapter = LoraAdapter(lora_A, lora_B, fan_in_fan_out=isinstance(layer, TransposedLinear))
        left, right = view_layer(layer).factors(adapter)
        torch.testing.assert_close(left @ right, expected)


def test_conv_delta_is_the_kernel_product() -> None:
    generator = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(2, 4, (3, 2))
    adapter = LoraAdapter(
        torch.randn(3, 2, 3, 2, generator=generator), torch.randn(4, 3, 1, 1, generator=generator)
    )
    left, right = view_layer(layer).factors(adapter)
    # PEFT's definition: conv of A (as input) with B (as kernel), transposed back.
    expected = torch.nn.functional.conv2d(adapter.lora_A.transpose(0, 1), adapter.lora_B).transpose(
        0, 1
    )
    torch.testing.assert_close((left @ right).reshape(layer.weight.shape), expected)


def test_grouped_conv_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        view_layer(nn.Conv2d(4, 4, 3, groups=2), "unet.conv")


def test_integer_weights_are_refused_with_the_supported_dtypes() -> None:
    layer = nn.Linear(3, 3)
    layer.weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedLayerError, match=r"int8.*bfloat16"):
        view_layer(layer, "q")


def test_quantized_and_unknown_layers_are_refused() -> None:
    class Linear4bit(nn.Linear):
        pass

    with pytest.raises(UnsupportedLayerError, match="not bitsandbytes"):
        view_layer(Linear4bit(3, 3), "q")
    with pytest.raises(UnsupportedLayerError, match="no weight"):
        view_layer(nn.ReLU(), "act")
    with pytest.raises(UnsupportedLayerError, match=r"LayerNorm|not a kind"):
        view_layer(nn.LayerNorm(4), "norm")


def test_shape_mismatch_names_both_sides() -> None:
    adapter = LoraAdapter(torch.zeros(2, 6), torch.zeros(3, 2))
    with pytest.raises(AdapterConfigError, match=r"'proj'.*in_features=5.*in_features=6"):
        view_layer(nn.Linear(5, 3), "proj").check_fits(adapter)


def test_fan_in_fan_out_must_match_the_layer() -> None:
    adapter = LoraAdapter(torch.zeros(2, 5), torch.zeros(3, 2))
    with pytest.raises(AdapterConfigError, match="fan_in_fan_out=True"):
        view_layer(TransposedLinear(5, 3), "c_attn").check_fits(adapter)
    flagged = LoraAdapter(torch.zeros(2, 5), torch.zeros(3, 2), fan_in_fan_out=True)
    with pytest.raises(AdapterConfigError, match="fan_in_fan_out=False"):
        view_layer(nn.Linear(5, 3), "q").check_fits(flagged)


def test_lora_bias_needs_a_layer_bias() -> None:
    adapter = LoraAdapter(torch.zeros(2, 5), torch.zeros(3, 2), lora_bias=torch.zeros(3))
    with pytest.raises(AdapterConfigError, match="no bias"):
        view_layer(nn.Linear(5, 3, bias=False), "q").check_fits(adapter)


def _layer_and_adapter(kind: str, dtype: torch.dtype) -> tuple[nn.Module, LoraAdapter]:
    generator = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    layer: nn.Module
    if kind == "linear with a LoRA bias":
        layer = nn.Linear(40, 24)
        adapter = LoraAdapter(randn(4, 40), randn(24, 4), 8.0, lora_bias=randn(24))
    elif kind == "DoRA":
        layer = nn.Linear(40, 24, bias=False)
        adapter = LoraAdapter(randn(4, 40), randn(24, 4), 8.0, magnitude=randn(24).abs() + 0.5)
    elif kind == "channels_last conv2d":
        layer = nn.Conv2d(6, 8, 3).to(memory_format=torch.channels_last)
        adapter = LoraAdapter(randn(2, 6, 3, 3), randn(8, 2, 1, 1))
    elif kind == "embedding":
        layer = nn.Embedding(30, 12)
        adapter = LoraAdapter(randn(3, 30), randn(12, 3))
    else:
        layer = TransposedLinear(40, 24)
        adapter = LoraAdapter(randn(4, 40), randn(24, 4), fan_in_fan_out=True)
    return layer.to(dtype), adapter


FUSED_KINDS = ["linear with a LoRA bias", "DoRA", "channels_last conv2d", "embedding", "Conv1D"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_tensors_are_fuse_s_bits_and_leave_the_layer_alone(
    kind: str, dtype: torch.dtype
) -> None:
    layer, adapter = _layer_and_adapter(kind, dtype)
    before = {name: tensor.detach().clone() for name, tensor in layer.state_dict().items()}
    fused = fused_tensors(layer, adapter, scale=0.5, name="x")
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    record = fuse(layer, adapter, scale=0.5, name="x", exact_unfuse=False)
    assert fused.weight.shape == layer.weight.shape and fused.weight.dtype == dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(fused.weight.view(bits), layer.weight.detach().view(bits))
    assert fused.record.correction is None and fused.record.coefficients == record.coefficients
    if kind == "linear with a LoRA bias":
        assert fused.bias is not None and torch.equal(fused.bias, layer.bias.detach())
    else:
        assert fused.bias is None


def test_fused_tensors_refuse_a_non_finite_merge_and_leave_the_layer_alone() -> None:
    layer = nn.Linear(16, 8).to(torch.float16)
    before = layer.weight.detach().clone()
    lora_B = torch.ones(8, 2)
    lora_B[5, 1] = 1e30
    with pytest.raises(NonFiniteMergeError, match="x"):
        fused_tensors(layer, LoraAdapter(torch.ones(2, 16), lora_B), name="x")
    assert torch.equal(layer.weight.detach(), before)


def test_fused_tensors_refuse_a_bitsandbytes_layer() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=False)
    with pytest.raises(UnsupportedLayerError, match="fused_tensors"):
        fused_tensors(layer, LoraAdapter(torch.ones(2, 16), torch.ones(8, 2)), name="x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fuse_in_a_buffer_is_fuse_s_bits_and_the_buffer_serves_layer_after_layer(
    dtype: torch.dtype,
) -> None:
    buffer = torch.empty(64 * 1024, dtype=torch.uint8)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for kind in FUSED_KINDS:
        layer, adapter = _layer_and_adapter(kind, dtype)
        expected = copy.deepcopy(layer)
        record = fuse_in_buffer(layer, adapter, buffer=buffer, scale=0.5, name="x")
        reference = fuse(expected, adapter, scale=0.5, name="x", exact_unfuse=False)
        assert record.correction is None and record.coefficients == reference.coefficients
        for name, tensor in layer.state_dict().items():
            wanted = expected.state_dict()[name]
            assert tensor.is_contiguous(memory_format=torch.channels_last) == (
                wanted.is_contiguous(memory_format=torch.channels_last)
            ), f"{kind}: {name}'s layout changed"
            if tensor.is_floating_point() and tensor.dtype == dtype:
                assert torch.equal(tensor.view(bits), wanted.view(bits)), f"{kind}: {name}"
            else:
                assert torch.equal(tensor, wanted), f"{kind}: {name}"


def test_a_fuse_in_a_buffer_refuses_a_buffer_that_does_not_fit_and_changes_nothing() -> None:
    layer, adapter = _layer_and_adapter("linear with a LoRA bias", torch.float32)
    before = {name: tensor.detach().clone() for name, tensor in layer.state_dict().items()}
    needed = layer.weight.numel() * 4
    for buffer in (
        torch.empty(needed - 1, dtype=torch.uint8),
        torch.empty(needed // 4, dtype=torch.float32),
        torch.empty(2 * needed, dtype=torch.uint8)[::2],
    ):
        with pytest.raises(ValueError, match=f"at least {needed} bytes"):
            fuse_in_buffer(layer, adapter, buffer=buffer, name="x")
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


@pytest.mark.parametrize("failure", ["non-finite", "exception midway"])
def test_a_fuse_in_a_buffer_that_fails_leaves_the_layer_as_it_was(failure: str) -> None:
    """Blocks of four rows: a failure in the third block finds the first two computed;
    only the buffer holds them, and the weight and the LoRA-biased bias are unchanged."""
    layer, adapter = _layer_and_adapter("linear with a LoRA bias", torch.float16)
    before = {name: tensor.detach().clone() for name, tensor in layer.state_dict().items()}
    if failure == "non-finite":
        adapter.lora_B[13, 0] = 6e4  # a row of the fourth block overflows float16
    original = Blocks.fuse_into
    calls = 0

    def failing(self: Blocks, *args: Any, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if failure == "exception midway" and calls == 3:
            raise RuntimeError("a failure midway")
        return original(self, *args, **kwargs)

    with (
        mock.patch.object(engine, "BLOCK_BYTES", 4 * 40 * 4),
        mock.patch.object(Blocks, "fuse_into", failing),
        engine.blocks_on(1),
        pytest.raises(NonFiniteMergeError if failure == "non-finite" else RuntimeError),
    ):
        fuse_in_buffer(layer, adapter, buffer=torch.empty(4096, dtype=torch.uint8), name="x")
    assert calls >= 3
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
