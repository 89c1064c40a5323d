"""LoraAdapter: rank, scale and the shape checks, with messages that say what is wrong."""

from __future__ import annotations

import math

import pytest
import torch

from safemerge import AdapterConfigError, LoraAdapter


def test_rank_and_scale_from_shapes_and_alpha() -> None:
    adapter = LoraAdapter(torch.zeros(8, 5), torch.zeros(3, 8), alpha=16)
    assert (adapter.rank, adapter.in_features, adapter.out_features) == (8, 5, 3)
    assert adapter.scale == 2.0
    assert LoraAdapter(torch.zeros(8, 5), torch.zeros(3, 8)).scale == 1.0


def test_rslora_scales_by_square_root_of_rank() -> None:
    adapter = LoraAdapter(torch.zeros(8, 5), torch.zeros(3, 8), alpha=16, use_rslora=True)
    assert adapter.scale == 16 / math.sqrt(8)


def test_conv_adapter_keeps_its_kernel() -> None:
    adapter = LoraAdapter(torch.zeros(4, 3, 3, 5), torch.zeros(6, 4, 1, 1))
    assert adapter.kernel_size == (3, 5)
    assert adapter.down_matrix().shape == (4, 45)
    assert adapter.up_matrix().shape == (6, 4)


def test_swapped_factors_are_explained() -> None:
    with pytest.raises(AdapterConfigError, match=r"lora_A.shape=\(3, 8\).*are they swapped"):
        LoraAdapter(torch.zeros(3, 8), torch.zeros(8, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lora_A": torch.zeros(0, 5), "lora_B": torch.zeros(3, 0)}, "rank must be at least 1"),
        ({"lora_A": torch.zeros(5), "lora_B": torch.zeros(3, 5)}, "both be matrices"),
        (
            {"lora_A": torch.zeros(2, 5, dtype=torch.int32), "lora_B": torch.zeros(3, 2)},
            "floating-point",
        ),
        ({"lora_A": torch.zeros(2, 3, 3, 3), "lora_B": torch.zeros(4, 2, 3, 3)}, "1x1 kernel"),
        (
            {"lora_A": torch.zeros(2, 5), "lora_B": torch.zeros(3, 2), "alpha": float("nan")},
            "alpha must be finite",
        ),
        (
            {"lora_A": torch.zeros(2, 5), "lora_B": torch.zeros(3, 2), "lora_bias": torch.zeros(4)},
            r"lora_bias must have out_features=3",
        ),
        (
            {"lora_A": torch.zeros(2, 5), "lora_B": torch.zeros(3, 2), "magnitude": torch.zeros(5)},
            r"magnitude must have out_features=3",
        ),
    ],
)
def test_bad_configs_are_refused_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(AdapterConfigError, match=message):
        LoraAdapter(**kwargs)  # type: ignore[arg-type]


def test_config_errors_are_value_errors_of_the_base_class() -> None:
    from safemerge import SafemergeError

    assert issubclass(AdapterConfigError, SafemergeError)
    assert issubclass(AdapterConfigError, ValueError)
