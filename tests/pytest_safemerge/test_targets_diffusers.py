"""pytest_safemerge.targets.diffusers: diffusers' own LoRA fuse behind the suite's contracts.

These pin the adapters themselves (what they hand diffusers, what they hand back, that
they go through diffusers' entry points), on cases diffusers gets right: float32 layers,
where its fuse is one float32 rounding like safemerge's, so the two agree to a few float32
ulps. What diffusers gets wrong is the suite's business (test_diffusers_findings.py).
"""

from __future__ import annotations

import copy
import gc
import logging
from typing import Any

import pytest
import torch
from torch import nn

import safemerge
from safemerge import LoraAdapter, synthetic

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
logging.getLogger("diffusers").setLevel(logging.ERROR)

from pytest_safemerge.implementations import load_implementation  # noqa: E402
from pytest_safemerge.targets import diffusers_legacy  # noqa: E402
from pytest_safemerge.targets.diffusers import (  # noqa: E402
    DIFFUSERS_LEGACY,
    DIFFUSERS_PEFT,
    PEFT_LAYER_KINDS,
    DiffusersLegacyFuse,
    DiffusersPeftFuse,
)

#: float32 merges of O(1) values: diffusers' and safemerge's float32 sums differ in order only.
ATOL = 1e-5
BOTH = [DIFFUSERS_PEFT, DIFFUSERS_LEGACY]
IDS = ["peft", "legacy"]


def _adapter_for(layer: nn.Module, seed: int = 0, **options: Any) -> LoraAdapter:
    return synthetic.random_adapter(layer, rank=4, alpha=8, std=0.5, seed=seed, **options)


def _expected(layer: nn.Module, adapters: list[LoraAdapter], scale: float) -> nn.Module:
    expected = copy.deepcopy(layer)
    safemerge.fuse(expected, adapters, scale=scale)
    return expected


def _factors(seed: int, out: int = 6, inner: int = 5, rank: int = 3) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(out, inner, generator=generator),
        torch.randn(rank, inner, generator=generator),
        torch.randn(out, rank, generator=generator),
    )


def test_declarations() -> None:
    assert DIFFUSERS_PEFT.layer_kinds == PEFT_LAYER_KINDS
    assert {"linear", "conv2d", "lora-bias", "dora", "several"} <= PEFT_LAYER_KINDS
    assert not {"embedding", "fan_in_fan_out", "nf4"} & PEFT_LAYER_KINDS
    assert DIFFUSERS_LEGACY.layer_kinds == frozenset({"linear", "conv2d"})
    for implementation in BOTH:
        assert implementation.exact_unfuse is False
        assert implementation.dtypes == {torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("name", ["DIFFUSERS_PEFT", "DIFFUSERS_LEGACY"])
def test_the_spec_names_load_with_valid_declarations(name: str) -> None:
    implementation = load_implementation(f"pytest_safemerge.targets.diffusers:{name}")
    assert isinstance(implementation.target, (DiffusersPeftFuse, DiffusersLegacyFuse))
    assert implementation.has_fuse_layer and implementation.has_unfuse_layer
    assert implementation.dtypes == {"float32", "float16", "bfloat16"}


# The tensor contract.


@pytest.mark.parametrize("implementation", BOTH, ids=IDS)
def test_fuse_returns_the_merge_and_leaves_the_weight(implementation: Any) -> None:
    weight, lora_A, lora_B = _factors(0)
    original = weight.clone()

    merged = implementation.fuse(weight, lora_A, lora_B, 0.75)

    assert torch.equal(weight, original)  # a merged copy is swapped in
    assert merged.dtype == weight.dtype and merged.shape == weight.shape
    torch.testing.assert_close(merged, original + 0.75 * lora_B @ lora_A, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", BOTH, ids=IDS)
def test_fuse_refuses_a_nan_with_a_value_error(implementation: Any) -> None:
    weight, lora_A, lora_B = _factors(1)
    original = weight.clone()
    lora_A[0, 2] = float("nan")

    with pytest.raises(ValueError, match="NaN"):
        implementation.fuse(weight, lora_A, lora_B, 1.0)
    assert torch.equal(weight, original)


@pytest.mark.parametrize("implementation", BOTH, ids=IDS)
def test_unfuse_undoes_the_fuse(implementation: Any) -> None:
    weight, lora_A, lora_B = _factors(2)
    merged = implementation.fuse(weight, lora_A, lora_B, 2.0)

    restored = implementation.unfuse(merged, lora_A, lora_B, 2.0)

    torch.testing.assert_close(restored, weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", BOTH, ids=IDS)
def test_unfuse_of_a_weight_fused_elsewhere_subtracts(implementation: Any) -> None:
    original, lora_A, lora_B = _factors(3)
    merged = original + 0.5 * lora_B @ lora_A

    restored = implementation.unfuse(merged, lora_A, lora_B, 0.5)

    torch.testing.assert_close(restored, original, atol=ATOL, rtol=0)


def test_the_peft_path_goes_through_diffusers_fuse_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.loaders.peft import PeftAdapterMixin

    calls: list[dict[str, Any]] = []
    real = PeftAdapterMixin.fuse_lora

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(PeftAdapterMixin, "fuse_lora", spy)
    weight, lora_A, lora_B = _factors(4)
    DIFFUSERS_PEFT.fuse(weight, lora_A, lora_B, 0.25)

    assert calls == [{"lora_scale": 0.25, "safe_fusing": True, "adapter_names": ["adapter_0"]}]


def test_the_tensor_maps_let_go_of_dropped_weights() -> None:
    for implementation in BOTH:
        weight, lora_A, lora_B = _factors(5)
        implementation.fuse(weight, lora_A, lora_B, 1.0)
    gc.collect()
    assert len(DIFFUSERS_PEFT._weights) == 0 and len(DIFFUSERS_LEGACY._weights) == 0


# The module-level contract.


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 5)


def _conv2d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3, padding=1)


@pytest.mark.parametrize("implementation", BOTH, ids=IDS)
@pytest.mark.parametrize("make", [_linear, _conv2d], ids=["linear", "conv2d"])
def test_fuse_layer_agrees_with_safemerge_and_unfuses(implementation: Any, make: Any) -> None:
    layer = make()
    adapter = _adapter_for(layer, use_rslora=True)
    expected = _expected(layer, [adapter], 0.5)
    original = copy.deepcopy(layer)

    implementation.fuse_layer(layer, [adapter], 0.5)

    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)
    assert torch.equal(layer.bias, original.bias)
    assert layer.weight.requires_grad  # the layer's flags, whatever loading does
    implementation.unfuse_layer(layer, [adapter], 0.5)
    torch.testing.assert_close(layer.weight, original.weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "options", [{"lora_bias": True}, {"dora": True}], ids=["lora-bias", "dora"]
)
def test_the_peft_path_fuses_what_diffusers_loads(options: dict[str, bool]) -> None:
    layer = _linear()
    adapter = _adapter_for(layer, **options)
    expected = _expected(layer, [adapter], 0.75)

    DIFFUSERS_PEFT.fuse_layer(layer, [adapter], 0.75)

    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.bias, expected.bias, atol=ATOL, rtol=0)


def test_the_peft_path_fuses_several_adapters_and_unfuses_them() -> None:
    layer = _conv2d()
    adapters = [_adapter_for(layer, seed=seed) for seed in (1, 2, 3)]
    expected = _expected(layer, adapters, 0.5)
    original = layer.weight.detach().clone()

    DIFFUSERS_PEFT.fuse_layer(layer, adapters, 0.5)
    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)
    DIFFUSERS_PEFT.unfuse_layer(layer, adapters, 0.5)

    torch.testing.assert_close(layer.weight, original, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", BOTH, ids=IDS)
def test_fuse_layer_refusal_leaves_the_layer(implementation: Any) -> None:
    layer = _linear()
    adapter = _adapter_for(layer)
    adapter.lora_B[0, 0] = float("nan")
    original = copy.deepcopy(layer)

    with pytest.raises(ValueError, match="NaN"):
        implementation.fuse_layer(layer, [adapter], 1.0)

    assert torch.equal(layer.weight, original.weight) and torch.equal(layer.bias, original.bias)


def test_the_legacy_path_holds_what_its_classes_hold() -> None:
    linear = _linear()
    with pytest.raises(TypeError, match="one adapter, not 2"):
        DIFFUSERS_LEGACY.fuse_layer(linear, [_adapter_for(linear), _adapter_for(linear)], 1.0)
    with pytest.raises(TypeError, match="plain LoRA only"):
        DIFFUSERS_LEGACY.fuse_layer(linear, [_adapter_for(linear, lora_bias=True)], 1.0)
    conv1d = nn.Conv1d(3, 4, 3)
    with pytest.raises(TypeError, match="no legacy LoRA layer for a Conv1d"):
        DIFFUSERS_LEGACY.fuse_layer(conv1d, [_adapter_for(conv1d)], 1.0)


def test_the_legacy_network_alpha_is_the_adapter_s_scale_times_its_rank() -> None:
    layer = _linear()
    for options in ({}, {"use_rslora": True}):
        adapter = _adapter_for(layer, **options)
        alpha = diffusers_legacy.network_alpha(adapter)
        assert alpha is not None
        assert alpha / adapter.rank == pytest.approx(adapter.scale, rel=1e-15)
    plain = LoraAdapter(torch.ones(2, 6), torch.ones(5, 2))
    assert diffusers_legacy.network_alpha(plain) is None  # scale 1: no alpha


def test_the_layer_maps_let_go_of_dropped_layers() -> None:
    for implementation in BOTH:
        layer = _linear()
        implementation.fuse_layer(layer, [_adapter_for(layer)], 1.0)
        del layer
    gc.collect()
    assert len(DIFFUSERS_PEFT._layers) == 0 and len(DIFFUSERS_LEGACY._layers) == 0
