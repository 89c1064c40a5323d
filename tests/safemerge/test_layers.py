"""Which layers fuse, how their weights are seen, and how the others are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safemerge import AdapterConfigError, LoraAdapter, UnsupportedLayerError
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
