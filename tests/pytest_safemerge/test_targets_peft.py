"""pytest_safemerge.targets.peft: PEFT's own merge code behind the suite's two contracts.

These pin the adapter object itself (what it hands PEFT, what it hands back), on cases
PEFT gets right: float32 layers, where PEFT's merge is one float32 rounding like
safemerge's, so the two agree to a few float32 ulps. What PEFT gets wrong is the suite's
business (tests/pytest_safemerge/test_peft_findings.py).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import types
import weakref

import pytest
import torch
from torch import nn

import safemerge
from safemerge import LoraAdapter, synthetic

pytest.importorskip("peft")
logging.getLogger("peft").setLevel(logging.ERROR)

from pytest_safemerge.implementations import Implementation  # noqa: E402
from pytest_safemerge.targets import peft_features  # noqa: E402
from pytest_safemerge.targets.peft import LAYER_KINDS, PEFT_LORA, PeftLoraMerge  # noqa: E402

#: float32 merges of O(1) values: PEFT's and safemerge's float32 sums differ in order only.
ATOL = 1e-5


def _adapter_for(layer: nn.Module, seed: int = 0, **options: object) -> LoraAdapter:
    return synthetic.random_adapter(layer, rank=4, alpha=8, std=0.5, seed=seed, **options)  # type: ignore[arg-type]


def _expected(layer: nn.Module, adapters: list[LoraAdapter], scale: float) -> nn.Module:
    expected = copy.deepcopy(layer)
    safemerge.fuse(expected, adapters, scale=scale)
    return expected


def test_layer_kinds_are_every_tag_of_the_suite_the_installed_peft_has() -> None:
    assert {"linear", "embedding", "conv1d", "conv2d", "conv3d", "fan_in_fan_out"} <= LAYER_KINDS
    assert {"nf4", "fp4", "int8", "lora-bias", "dora", "several"} <= LAYER_KINDS
    missing = peft_features.installed().missing()
    assert PEFT_LORA.unsupported == missing
    assert PEFT_LORA.layer_kinds == LAYER_KINDS - missing.keys()
    assert PEFT_LORA.exact_unfuse is False
    assert isinstance(PEFT_LORA, PeftLoraMerge)
    # The suite takes the declarations as they are.
    Implementation("safemerge.peft:PEFT_LORA", PEFT_LORA).check_declarations()


# What a PEFT release has, read from modules laid out as each era's were.


def _modules(
    version: str, layers: tuple[str, ...], dora: tuple[str, ...] | None, *, lora_bias: bool
) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType | None]:
    """Stand-ins for ``peft``, ``peft.tuners.lora.layer`` and ``peft.tuners.lora.dora``."""
    fields = ["r", "use_dora", *(["lora_bias"] if lora_bias else [])]
    config = dataclasses.make_dataclass("LoraConfig", [(name, object, None) for name in fields])

    class Linear:
        def __init__(self, base_layer: object, adapter_name: str, r: int = 0) -> None: ...
        def set_adapter(self, adapter_names: list[str]) -> None: ...

    def module(name: str, **members: object) -> types.ModuleType:
        made = types.ModuleType(name)
        vars(made).update(members)
        return made

    peft = module("peft", __version__=version, LoraConfig=config)
    layer = module("layer", Linear=Linear, **{name: type(name, (), {}) for name in layers})
    dora_module = None if dora is None else module("dora", **{name: object for name in dora})
    return peft, layer, dora_module


def test_features_of_a_release_before_the_dora_module() -> None:
    # PEFT 0.10.0: Linear, Embedding and Conv2d layers; DoRA inside LoraLayer; no lora_bias.
    features = peft_features.read(
        *_modules("0.10.0", ("Embedding", "Conv2d"), None, lora_bias=False)
    )

    assert features.layer_kinds == {"linear", "fan_in_fan_out", "embedding", "conv2d"}
    assert features.dora_kinds == {"linear", "fan_in_fan_out", "conv2d"}
    assert not features.layers_take_config and not features.set_adapter_takes_inference_mode
    assert features.missing() == {
        "lora-bias": "PEFT 0.10.0 has no lora_bias (added in 0.14.0)",
        "conv1d": "PEFT 0.10.0 has no LoRA layer for Conv1d (added in 0.15.0)",
        "conv3d": "PEFT 0.10.0 has no LoRA layer for Conv3d (added in 0.14.0)",
        "embedding+dora": "PEFT 0.10.0 has no DoRA on Embedding (added in 0.13.0)",
        "conv1d+dora": "PEFT 0.10.0 has no DoRA on Conv1d (added in 0.16.0)",
    }


def test_features_of_a_release_with_the_dora_module() -> None:
    # PEFT 0.15.2: every layer kind; DoRA layer classes for all but Conv1d.
    dora = ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv2dLayer", "DoraConv3dLayer")
    modules = _modules("0.15.2", ("Embedding", "Conv1d", "Conv2d", "Conv3d"), dora, lora_bias=True)
    features = peft_features.read(*modules)

    assert features.layer_kinds == {"linear", "fan_in_fan_out", "embedding"} | {
        "conv1d",
        "conv2d",
        "conv3d",
    }
    assert features.dora_kinds == features.layer_kinds - {"conv1d"}
    assert features.missing() == {
        "conv1d+dora": "PEFT 0.15.2 has no DoRA on Conv1d (added in 0.16.0)"
    }


@pytest.fixture
def peft_without_lora_bias_or_embedding_dora(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed PEFT, said to lack lora_bias and DoRA on embeddings."""
    real = peft_features.installed()
    older = peft_features.PeftFeatures(
        version="0.12.0",
        layer_kinds=real.layer_kinds,
        dora_kinds=real.dora_kinds - {"embedding"},
        lora_bias=False,
        layers_take_config=real.layers_take_config,
        set_adapter_takes_inference_mode=real.set_adapter_takes_inference_mode,
    )
    monkeypatch.setattr(peft_features, "installed", lambda: older)


@pytest.mark.usefixtures("peft_without_lora_bias_or_embedding_dora")
def test_what_the_release_lacks_is_declared_and_refused_with_its_reason() -> None:
    implementation = Implementation("safemerge.peft:PEFT_LORA", PEFT_LORA)
    implementation.check_declarations()
    assert "lora-bias" not in implementation.layer_kinds
    assert "dora" in implementation.tags_for("linear")
    assert "dora" not in implementation.tags_for("embedding")

    linear = synthetic.random_layer("linear", 6, 5, seed=1)
    original = linear.weight.detach().clone()
    biased = _adapter_for(linear, lora_bias=True)
    with pytest.raises(TypeError, match=r"PEFT 0\.12\.0 has no lora_bias \(added in 0\.14\.0\)"):
        PEFT_LORA.fuse_layer(linear, [biased], 1.0)
    embedding = synthetic.random_layer("embedding", 6, 5, seed=2)
    with pytest.raises(TypeError, match=r"has no DoRA on Embedding \(added in 0\.13\.0\)"):
        PEFT_LORA.fuse_layer(embedding, [_adapter_for(embedding, dora=True)], 1.0)
    assert torch.equal(linear.weight, original)  # refused before PEFT saw it


def test_the_documented_spec_name_still_resolves() -> None:
    import safemerge.peft

    assert safemerge.peft.PEFT_LORA is PEFT_LORA
    assert safemerge.peft.PeftLoraMerge is PeftLoraMerge
    with pytest.raises(AttributeError, match="no attribute 'PEFT_LOAR'"):
        safemerge.peft.PEFT_LOAR  # noqa: B018


# The tensor contract.


def test_fuse_returns_the_merge_and_leaves_the_weight() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator)
    lora_A, lora_B = torch.randn(3, 5, generator=generator), torch.randn(6, 3, generator=generator)
    original = weight.clone()

    merged = PEFT_LORA.fuse(weight, lora_A, lora_B, 0.75)

    assert torch.equal(weight, original)  # PEFT's safe merge swaps in a copy
    assert merged.dtype == weight.dtype and merged.shape == weight.shape
    torch.testing.assert_close(merged, original + 0.75 * lora_B @ lora_A, atol=ATOL, rtol=0)


def test_fuse_keeps_the_weight_dtype_and_the_adapter_tensors() -> None:
    weight = torch.randn(4, 4).to(torch.bfloat16)
    lora_A, lora_B = torch.randn(2, 4), torch.randn(4, 2)
    A_before, B_before = lora_A.clone(), lora_B.clone()

    merged = PEFT_LORA.fuse(weight, lora_A, lora_B, 1.0)

    assert merged.dtype == torch.bfloat16
    assert torch.equal(lora_A, A_before) and torch.equal(lora_B, B_before)


def test_fuse_refusal_is_peft_s_error_and_leaves_the_weight() -> None:
    weight = torch.randn(3, 3)
    original = weight.clone()
    lora_A = torch.randn(1, 3)
    lora_A[0, 2] = float("nan")

    with pytest.raises(ValueError, match="NaNs detected"):
        PEFT_LORA.fuse(weight, lora_A, torch.ones(3, 1), 1.0)
    assert torch.equal(weight, original)


def test_unfuse_undoes_the_fuse_on_the_same_peft_layer() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 7, generator=generator)
    lora_A, lora_B = torch.randn(2, 7, generator=generator), torch.randn(5, 2, generator=generator)
    merged = PEFT_LORA.fuse(weight, lora_A, lora_B, 2.0)

    restored = PEFT_LORA.unfuse(merged, lora_A, lora_B, 2.0)

    assert restored.data_ptr() == merged.data_ptr()  # PEFT unmerges in place
    torch.testing.assert_close(merged, weight, atol=ATOL, rtol=0)


def test_unfuse_of_a_weight_fused_elsewhere_subtracts() -> None:
    generator = torch.Generator().manual_seed(2)
    lora_A, lora_B = torch.randn(2, 4, generator=generator), torch.randn(3, 2, generator=generator)
    original = torch.randn(3, 4, generator=generator)
    merged = original + 0.5 * lora_B @ lora_A

    restored = PEFT_LORA.unfuse(merged, lora_A, lora_B, 0.5)

    torch.testing.assert_close(restored, original, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged, original, atol=ATOL, rtol=0)  # written in place


def test_stacked_fuses_unfuse_in_reverse() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 4, generator=generator)
    first = (torch.randn(2, 4, generator=generator), torch.randn(4, 2, generator=generator))
    second = (torch.randn(1, 4, generator=generator), torch.randn(4, 1, generator=generator))
    after_first = PEFT_LORA.fuse(weight, *first, 1.0)
    snapshot = after_first.clone()
    after_second = PEFT_LORA.fuse(after_first, *second, 1.0)

    back = PEFT_LORA.unfuse(after_second, *second, 1.0)

    torch.testing.assert_close(back, snapshot, atol=ATOL, rtol=0)
    assert torch.equal(after_first, snapshot)  # the second fuse did not write the first's


def test_the_tensor_map_lets_go_of_dropped_weights() -> None:
    implementation = PeftLoraMerge()
    merged = implementation.fuse(torch.randn(3, 3), torch.randn(1, 3), torch.randn(3, 1), 1.0)
    assert len(implementation._weights) == 1
    del merged
    gc.collect()
    assert len(implementation._weights) == 0


# The module-level contract.


@pytest.mark.parametrize("kind", synthetic.LAYER_KINDS)
def test_fuse_layer_merges_into_the_suite_s_layer_and_unfuses(kind: str) -> None:
    layer = synthetic.random_layer(kind, 8, 6, std=0.5, seed=4)
    adapter = _adapter_for(layer)
    expected = _expected(layer, [adapter], 0.7)
    weight_object = layer.weight
    original = layer.weight.detach().clone()

    PEFT_LORA.fuse_layer(layer, [adapter], 0.7)

    assert layer.weight is weight_object  # PEFT wrote the suite's layer, not a copy
    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)
    PEFT_LORA.unfuse_layer(layer, [adapter], 0.7)
    torch.testing.assert_close(layer.weight, original, atol=ATOL, rtol=0)


def test_fuse_layer_takes_transformers_conv1d() -> None:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = conv1d(6, 8)  # (in, out) = (8, 6)
    nn.init.normal_(layer.weight, std=0.5)
    adapter = LoraAdapter(torch.randn(2, 8), torch.randn(6, 2), fan_in_fan_out=True)
    transposed = synthetic.TransposedLinear(8, 6)
    with torch.no_grad():
        transposed.weight.copy_(layer.weight)
        transposed.bias.copy_(layer.bias)
    expected = _expected(transposed, [adapter], 1.0)

    PEFT_LORA.fuse_layer(layer, [adapter], 1.0)

    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "fan_in_fan_out"])
def test_fuse_layer_merges_the_lora_bias(kind: str) -> None:
    layer = synthetic.random_layer(kind, 8, 6, std=0.5, seed=5)
    adapter = _adapter_for(layer, lora_bias=True)
    expected = _expected(layer, [adapter], 1.5)

    PEFT_LORA.fuse_layer(layer, [adapter], 1.5)

    torch.testing.assert_close(layer.bias, expected.bias, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d", "fan_in_fan_out"])
def test_fuse_layer_dora_loads_the_magnitude(kind: str) -> None:
    layer = synthetic.random_layer(kind, 8, 6, std=0.5, seed=6)
    adapter = _adapter_for(layer, dora=True)
    expected = _expected(layer, [adapter], 1.0)

    PEFT_LORA.fuse_layer(layer, [adapter], 1.0)

    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)
    PEFT_LORA.unfuse_layer(layer, [adapter], 1.0)  # on the PEFT layer that cached the norm


def test_fuse_layer_merges_several_adapters_with_their_own_scales() -> None:
    layer = synthetic.random_layer("linear", 8, 6, std=0.5, seed=7)
    adapters = [
        _adapter_for(layer, seed=1),
        synthetic.random_adapter(layer, rank=2, alpha=3.0, use_rslora=True, std=0.5, seed=2),
    ]
    expected = _expected(layer, adapters, -0.5)

    PEFT_LORA.fuse_layer(layer, adapters, -0.5)

    torch.testing.assert_close(layer.weight, expected.weight, atol=ATOL, rtol=0)


def test_fuse_layer_refusal_propagates_peft_s_error() -> None:
    layer = synthetic.random_layer("linear", 8, 6, seed=8)
    adapter = _adapter_for(layer)
    adapter.lora_B[0, 0] = float("inf")
    original = layer.weight.detach().clone()

    with pytest.raises(ValueError, match="NaNs detected"):
        PEFT_LORA.fuse_layer(layer, [adapter], 1.0)
    assert torch.equal(layer.weight, original)


def test_unfuse_layer_of_a_layer_fused_elsewhere() -> None:
    layer = synthetic.random_layer("conv1d", 4, 6, std=0.5, seed=9)
    adapter = _adapter_for(layer)
    original = layer.weight.detach().clone()
    safemerge.fuse(layer, adapter, scale=2.0)

    PEFT_LORA.unfuse_layer(layer, [adapter], 2.0)

    torch.testing.assert_close(layer.weight, original, atol=ATOL, rtol=0)


def test_unfuse_layer_of_dora_needs_peft_s_own_merge() -> None:
    layer = synthetic.random_layer("linear", 8, 6, seed=10)
    with pytest.raises(ValueError, match="DoRA"):
        PEFT_LORA.unfuse_layer(layer, [_adapter_for(layer, dora=True)], 1.0)


def test_fuse_layer_does_not_keep_the_layer_alive() -> None:
    implementation = PeftLoraMerge()
    layer = synthetic.random_layer("linear", 4, 4, seed=11)
    implementation.fuse_layer(layer, [_adapter_for(layer)], 1.0)
    alive = weakref.ref(layer)
    del layer
    gc.collect()
    assert alive() is None


def test_fuse_layer_rejects_what_peft_cannot_hold() -> None:
    with pytest.raises(TypeError, match="no LoRA layer"):
        PEFT_LORA.fuse_layer(
            nn.LayerNorm(4), [LoraAdapter(torch.ones(1, 4), torch.ones(4, 1))], 1.0
        )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_fuse_layer_goes_through_peft_s_bitsandbytes_layers(quant_type: str) -> None:
    pytest.importorskip("bitsandbytes")
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(4, 64, generator=generator) * 0.1
    layer = synthetic.quantized_linear(weight, quant_type)
    adapter = synthetic.random_adapter(layer, rank=2, std=0.5, seed=3)
    packed = layer.weight.data.clone()

    PEFT_LORA.fuse_layer(layer, [adapter], 1.0)

    assert not torch.equal(layer.weight.data, packed)  # PEFT requantized into the suite's layer
    assert type(layer.weight).__module__.startswith("bitsandbytes")
