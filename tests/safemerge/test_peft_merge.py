"""safemerge.peft: merge_and_unload, merge and unmerge on real PEFT models.

The reference is PEFT itself, run in float64 on a copy of the model: its merge is then
exact far beyond the float32 merge's bound, so each merged weight must lie within
``safemerge.expected_fuse``'s bound of it (an independent check of both the arithmetic
and of how safemerge reads PEFT's layers: scaling, rsLoRA, patterns, fan_in_fan_out,
embeddings, convolutions, lora_bias, DoRA).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

import safemerge
import safemerge.peft
from safemerge.peft.layers import plan_merge
from safemerge.quant import bnb
from safemerge.synthetic import quantized_linear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(nn.Module):
    """Every layer kind PEFT's LoRA merges, small."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.proj = nn.Linear(16, 24)
        self.out = nn.Linear(24, 16, bias=True)
        self.conv1 = nn.Conv1d(4, 6, 3)
        self.conv2 = nn.Conv2d(4, 6, (3, 2))
        self.conv3 = nn.Conv3d(2, 4, 2)
        self.gpt2 = Conv1D(12, 16)  # GPT-2's: weight stored (in, out)
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.out(self.proj(self.embed(tokens)))
        signal = hidden.reshape(hidden.shape[0], 4, -1)
        pooled = (
            self.conv1(signal).mean() + self.conv2(signal[..., None].expand(-1, -1, -1, 2)).mean()
        )
        volume = hidden.reshape(hidden.shape[0], 2, 2, 2, -1)
        return self.gpt2(hidden).sum(-1) + pooled + self.conv3(volume).mean()


TARGETS = ["embed", "proj", "out", "conv1", "conv2", "conv3"]


def _peft(dtype: torch.dtype, seed: int = 0, **options: Any) -> Any:
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False, **options
    )
    model = get_peft_model(Net(dtype), config)
    gpt2 = LoraConfig(
        r=3, lora_alpha=5, target_modules=["gpt2"], fan_in_fan_out=True, init_lora_weights=False
    )
    model.add_adapter("gpt2", gpt2)
    model.base_model.set_adapter(["default", "gpt2"])
    _randomise(model)
    return model


def _randomise(model: nn.Module) -> None:
    """Non-zero lora_B, biases and magnitudes, so every term of the merge matters."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter.float()).to(parameter.dtype) * 0.3)
                if "magnitude" in name:
                    parameter.abs_().add_(0.5)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_same_bits(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [name for name in before if not _same_bits(before[name], after[name])]
    assert not changed, f"changed: {changed}"


def _same_bits(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Bit for bit (``torch.equal`` calls NaN unequal to itself)."""
    if first.shape != second.shape or first.dtype != second.dtype:
        return False
    return torch.equal(first.contiguous().view(torch.uint8), second.contiguous().view(torch.uint8))


def _expected(model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per merged weight: PEFT's float64 merge, and safemerge's bound for the merge."""
    reference = copy.deepcopy(model).to(torch.float64).merge_and_unload()
    weights = dict(reference.named_parameters())
    expected = {}
    for layer in plan_merge(model.base_model.model, None):
        _, bound = safemerge.expected_fuse(layer.base, list(layer.pairs))
        name = layer.name.removeprefix("base_model.model.") + ".weight"
        expected[name] = (weights[name].detach(), bound)
    return expected


def _assert_within_bound(merged: nn.Module, expected: dict[str, Any]) -> None:
    parameters = dict(merged.named_parameters())
    for name, (reference, bound) in expected.items():
        error = (parameters[name].detach().double() - reference).abs()
        # PEFT's float64 merge is itself off by a few float64 ulps.
        allowed = bound + 1e-12 * reference.abs()
        worst = float((error / allowed).max())
        assert worst <= 1.0, f"{name}: error {worst:.3g} of its bound"


OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"proj": 2, "conv2": 5}, "alpha_pattern": {"out": 11.0}},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_merge_and_unload_matches_peft_within_the_bound(
    dtype: torch.dtype, options: dict[str, Any]
) -> None:
    model = _peft(dtype, **options)
    expected = _expected(model)
    assert len(expected) == len(TARGETS) + 1
    merged = safemerge.peft.merge_and_unload(model)
    assert type(merged) is Net
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    assert all(parameter.dtype == dtype for parameter in merged.parameters())
    _assert_within_bound(merged, expected)


def test_lora_bias_and_dora_match_peft() -> None:
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["proj", "out"], lora_bias=True, init_lora_weights=False
    )
    model = get_peft_model(Net(torch.float32), config)
    dora = LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["embed", "conv2", "gpt2"],
        use_dora=True,
        fan_in_fan_out=False,
        init_lora_weights=False,
    )
    model.add_adapter("dora", dora)
    model.base_model.set_adapter(["default", "dora"])
    _randomise(model)
    reference = copy.deepcopy(model).to(torch.float64).merge_and_unload()
    expected = _expected(model)
    merged = safemerge.peft.merge_and_unload(model)
    _assert_within_bound(merged, expected)
    for name in ("proj.bias", "out.bias"):
        ours, theirs = merged.get_parameter(name).double(), reference.get_parameter(name)
        torch.testing.assert_close(ours, theirs, rtol=4 * 2.0**-24, atol=0)


def test_merged_model_computes_what_the_adapted_model_computes() -> None:
    model = _peft(torch.float32, use_rslora=True)
    tokens = torch.randint(0, 40, (3, 8))
    with torch.no_grad():
        adapted = model(tokens)
        merged = safemerge.peft.merge_and_unload(model)(tokens)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_merge_then_unmerge_restores_every_bit_and_keeps_adapters() -> None:
    model = _peft(torch.bfloat16)
    before = _state(model)
    tokens = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        adapted = model(tokens).float()
    report = safemerge.peft.merge(model)
    assert len(report.layers) == len(TARGETS) + 1
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(layer.merged for layer in layers)
    with torch.no_grad():
        merged = model(tokens).float()
    torch.testing.assert_close(merged, adapted, rtol=0.05, atol=0.05)  # bfloat16 weights
    safemerge.peft.unmerge(model)
    _assert_same_bits(before, model)
    assert not any(layer.merged for layer in layers)


def test_peft_own_unmerge_is_not_exact_in_bfloat16() -> None:
    """Why unmerge keeps corrections: PEFT's subtraction leaves many weights off by an ulp."""
    model = _peft(torch.bfloat16)
    weight = model.base_model.model.proj.base_layer.weight
    before = weight.detach().clone()
    model.merge_adapter(adapter_names=["default"])
    model.unmerge_adapter()
    assert not torch.equal(weight, before)


def test_unmerge_refuses_a_layer_changed_since_the_merge() -> None:
    model = _peft(torch.float32)
    safemerge.peft.merge(model)
    proj = model.base_model.model.proj
    with torch.no_grad():
        proj.base_layer.weight.mul_(1.5)
    snapshot = _state(model)
    with pytest.raises(safemerge.RestoreError, match=r"changed since safemerge merged.*proj"):
        safemerge.peft.unmerge(model)
    _assert_same_bits(snapshot, model)


@pytest.mark.parametrize("where", ["lora_B", "lora_A", "bias"])
def test_a_broken_adapter_anywhere_leaves_the_model_as_it_was(where: str) -> None:
    torch.manual_seed(2)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[1:3], lora_bias=True, init_lora_weights=False
    )
    model = get_peft_model(Net(torch.bfloat16), config)
    _randomise(model)
    out = model.base_model.model.out  # the last layer merged
    tensor = {
        "lora_B": out.lora_B["default"].weight,
        "lora_A": out.lora_A["default"].weight,
        "bias": out.lora_B["default"].bias,
    }[where]
    with torch.no_grad():
        tensor.view(-1)[-1] = float("nan")
    before = _state(model)
    with pytest.raises(safemerge.NonFiniteMergeError) as raised:
        safemerge.peft.merge_and_unload(model)
    assert raised.value.layer == "out.weight"
    _assert_same_bits(before, model)
    assert isinstance(model.base_model.model.out, LoraLayer)  # adapters still attached
    with pytest.raises(safemerge.NonFiniteMergeError):
        safemerge.peft.merge(model)
    _assert_same_bits(before, model)


def test_overflow_in_a_later_layer_rolls_back_the_layers_merged_before() -> None:
    """float16 weights near the top of the range cannot be proven safe from the bound: they
    are merged first, with corrections, and an overflow in the second one unmerges the first."""
    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["proj", "out"], init_lora_weights=False)
    model = get_peft_model(Net(torch.float16), config)
    with torch.no_grad():
        for name in ("proj", "out"):
            layer = model.base_model.model.get_submodule(name)
            layer.base_layer.weight.fill_(60000.0)
            layer.lora_A["default"].weight.fill_(1.0)
            layer.lora_B["default"].weight.fill_(-1.0 if name == "proj" else 5000.0)
    before = _state(model)
    with pytest.raises(safemerge.NonFiniteMergeError, match=r"'out\.weight'") as raised:
        safemerge.peft.merge_and_unload(model)
    assert "the 1 layer(s) merged before it were restored exactly" in "\n".join(
        getattr(raised.value, "__notes__", [])
    )
    _assert_same_bits(before, model)


def test_merge_near_the_range_that_fits_is_merged() -> None:
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["proj"], init_lora_weights=False)
    model = get_peft_model(Net(torch.float16), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.fill_(-60000.0)
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.fill_(70000.0)  # W + delta = 10000: fine
    merged = safemerge.peft.merge_and_unload(model)
    assert torch.equal(merged.proj.weight, torch.full_like(merged.proj.weight, 10000.0))


def _refused(model: Any, call: Callable[[Any], Any], *fragments: str) -> None:
    before = _state(model)
    with pytest.raises(safemerge.SafemergeError) as raised:
        call(model)
    for fragment in fragments:
        assert fragment in str(raised.value)
    _assert_same_bits(before, model)


def test_unsupported_models_and_layers_are_refused_before_any_change() -> None:
    loha = get_peft_model(Net(torch.float32), LoHaConfig(r=2, target_modules=["proj"]))
    _refused(loha, safemerge.peft.merge_and_unload, "LoHaModel", "PEFT's own")

    mha = nn.Sequential()
    mha.add_module("attention", nn.MultiheadAttention(8, 2))
    mha.add_module("proj", nn.Linear(8, 8))
    config = LoraConfig(r=2, target_modules=["attention", "proj"], init_lora_weights=False)
    model = get_peft_model(mha, config)
    _refused(
        model, safemerge.peft.merge_and_unload, "attention", "MultiheadAttention", "not changed"
    )

    two = _peft(torch.float32)
    dora = LoraConfig(r=2, target_modules=["proj"], use_dora=True, init_lora_weights=False)
    two.add_adapter("dora", dora)
    two.base_model.set_adapter(["default", "dora"])
    _refused(two, safemerge.peft.merge_and_unload, "proj", "DoRA", "merge one DoRA adapter alone")

    _refused(
        _peft(torch.float32),
        lambda m: safemerge.peft.merge(m, adapter_names=["typo"]),
        "no LoRA layer has the adapter(s) ['typo']",
    )


def test_tied_weights_are_refused() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

    config = LoraConfig(r=2, target_modules=["head"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Tied(), config)
    _refused(model, safemerge.peft.merge_and_unload, "tied weights")


def test_already_merged_adapters_are_not_merged_again() -> None:
    model = _peft(torch.float32)
    model.merge_adapter(adapter_names=["gpt2"])  # PEFT's own merge of one adapter
    gpt2_weight = model.base_model.model.gpt2.base_layer.weight.detach().clone()
    merged = safemerge.peft.merge_and_unload(model)
    assert torch.equal(merged.gpt2.weight, gpt2_weight)


def test_only_the_named_adapters_are_merged() -> None:
    model = _peft(torch.float32)
    gpt2 = model.base_model.model.gpt2.base_layer.weight.detach().clone()
    proj = model.base_model.model.proj.base_layer.weight.detach().clone()
    merged = safemerge.peft.merge_and_unload(model, adapter_names=["default"])
    assert torch.equal(merged.gpt2.weight, gpt2)
    assert not torch.equal(merged.proj.weight, proj)


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_bitsandbytes_bases_merge_within_the_quantization_bound(quant_type: str) -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(4)
    model = nn.Sequential()
    for name in ("first", "second"):
        weight = torch.randn(32, 64) * 0.05
        model.add_module(name, quantized_linear(weight, quant_type, bias=torch.randn(32)))
    if quant_type == "nf4":
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["first", "second"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    _randomise(peft_model)
    ideals = {}
    for layer in plan_merge(peft_model.base_model.model, None):
        base = layer.base
        quantized_format = bnb.format_of(base, layer.name)
        values = quantized_format.read().double()
        ((adapter, scaling),) = layer.pairs
        delta = scaling * adapter.lora_B.double() @ adapter.lora_A.double()
        ideals[layer.name.removeprefix("base_model.model.")] = values + delta
    merged = safemerge.peft.merge_and_unload(peft_model)
    for name, ideal in ideals.items():
        values, bound = safemerge.quantization_bound(merged.get_submodule(name), ideal.float())
        assert bool(((values.double() - ideal).abs() <= bound.double() + 1e-6 * ideal.abs()).all())


def test_bitsandbytes_merge_unmerge_is_exact_and_refusal_atomic() -> None:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(5)
    model = nn.Sequential()
    model.add_module("first", quantized_linear(torch.randn(32, 64) * 0.05, "nf4"))
    model.is_loaded_in_4bit = True
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["first"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    _randomise(peft_model)
    before = _state(peft_model)
    safemerge.peft.merge(peft_model)
    safemerge.peft.unmerge(peft_model)
    _assert_same_bits(before, peft_model)
    with torch.no_grad():
        peft_model.base_model.model.first.lora_B["default"].weight[0, 0] = float("inf")
    before = _state(peft_model)
    with pytest.raises(safemerge.NonFiniteMergeError):
        safemerge.peft.merge_and_unload(peft_model)
    _assert_same_bits(before, peft_model)
