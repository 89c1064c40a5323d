"""Fusing into bitsandbytes 4-bit layers, for real on the CPU: bounds, exactness, atomicity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import safemerge
from safemerge import LoraAdapter, NonFiniteMergeError, QuantizedFuseRecord, synthetic
from safemerge.quant.grid import blockwise_bound, largest_half_gap

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")


def linear_4bit(
    out_features: int,
    in_features: int,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    nested: bool = False,
    seed: int = 0,
) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    bias = torch.randn(out_features, generator=generator) * 0.01
    return synthetic.quantized_linear(
        weight,
        quant_type,
        blocksize=blocksize,
        nested=nested,
        bias=bias,
        compute_dtype=torch.bfloat16,
    )


def adapter_for(
    layer: nn.Module, *, rank: int = 8, size: float = 0.05, seed: int = 1
) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    lora_A = torch.randn(rank, layer.in_features, generator=generator) * size
    lora_B = torch.randn(layer.out_features, rank, generator=generator) * size
    return LoraAdapter(lora_A, lora_B, alpha=2 * rank)


def state_bits(layer: nn.Module) -> list[torch.Tensor]:
    """Every tensor that defines a 4-bit weight: packed bytes, absmax, nested state."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax, layer.bias.detach()]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, torch.as_tensor(state.offset)]
    return [tensor.detach().clone().reshape(-1).view(torch.uint8) for tensor in tensors]


def assert_same_state(layer: nn.Module, before: list[torch.Tensor]) -> None:
    after = state_bits(layer)
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def float32_twin(layer: nn.Module) -> nn.Linear:
    """A float32 nn.Linear holding exactly what the 4-bit layer holds."""
    from safemerge.quant import bnb as bnb_io

    twin = nn.Linear(layer.in_features, layer.out_features)
    twin.weight.data = bnb_io.format_of(layer, "twin").read()
    twin.bias.data = layer.bias.detach().float().clone()
    return twin


CONFIGS = [
    pytest.param(
        quant_type,
        nested,
        blocksize,
        in_features,
        id=f"{quant_type}-{'nested' if nested else 'plain'}-bs{blocksize}-in{in_features}",
    )
    for quant_type in ("nf4", "fp4")
    for nested in (False, True)
    for blocksize, in_features in ((32, 96), (64, 128), (256, 128), (1024, 256), (4096, 4096))
]


@pytest.mark.parametrize(("quant_type", "nested", "blocksize", "in_features"), CONFIGS)
def test_fuse_requantizes_the_float32_merge_with_the_same_settings(
    quant_type: str, nested: bool, blocksize: int, in_features: int
) -> None:
    layer = linear_4bit(16, in_features, quant_type=quant_type, blocksize=blocksize, nested=nested)
    adapter = adapter_for(layer)
    twin = float32_twin(layer)
    before = state_bits(layer)
    _, accumulated = safemerge.expected_fuse(twin, [(adapter, 1.0)])
    exact = twin.weight.detach().double() + adapter.scale * (
        adapter.lora_B.double() @ adapter.lora_A.double()
    )

    record = safemerge.fuse(layer, adapter, name="proj")
    safemerge.fuse(twin, adapter)  # the float path's float32 merge of the same weight

    assert isinstance(record, QuantizedFuseRecord)
    assert record.settings == {"quant_type": quant_type, "blocksize": blocksize, "nested": nested}
    # 1. Exactly bitsandbytes' quantizer applied to the float32 merge, same settings.
    packed, state = bnb_functional.quantize_4bit(
        twin.weight.detach(), blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    assert torch.equal(layer.weight.data.view(torch.uint8), packed.view(torch.uint8))
    assert torch.equal(layer.weight.quant_state.absmax, state.absmax)
    # 2. Every element within its own block's rounding bound (plus the float32 merge's).
    from safemerge.quant import bnb as bnb_io

    fused = bnb_io.format_of(layer, "proj").read().double()
    stored = bnb_io._stored_absmax(layer.weight.quant_state)
    bound = blockwise_bound(twin.weight.detach(), blocksize, quant_type, stored).reshape(
        fused.shape
    )
    assert bool(((fused - exact).abs() <= bound + accumulated).all())
    assert 0.0 < record.worst_error_of_bound <= 1.0
    # 3. Exact unfuse: every byte of the packed weight, absmax, nested state and bias.
    safemerge.unfuse(layer, record)
    assert_same_state(layer, before)


def test_the_bound_is_the_code_grids_half_gap() -> None:
    assert round(largest_half_gap("nf4"), 4) == 0.1519
    assert round(largest_half_gap("fp4"), 4) == 0.1667
    for quant_type in ("nf4", "fp4"):
        code = bnb_functional.get_4bit_type(quant_type, device="cpu")
        from safemerge.quant.grid import CODES

        torch.testing.assert_close(code, torch.tensor(CODES[quant_type]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_adapters_are_refused_and_nothing_changes(poison: float) -> None:
    layer = linear_4bit(16, 64)
    adapter = adapter_for(layer)
    adapter.lora_B[-1, -1] = poison
    before = state_bits(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        safemerge.fuse(layer, adapter, name="q_proj")
    assert caught.value.layer == "q_proj" and caught.value.bad_count > 0
    assert_same_state(layer, before)


def test_an_exception_during_requantization_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safemerge.quant import bnb as bnb_io

    layer = linear_4bit(16, 64, nested=True)
    plain = adapter_for(layer)
    adapter = LoraAdapter(plain.lora_A, plain.lora_B, alpha=16, lora_bias=torch.ones(16))
    before = state_bits(layer)

    def failing_quantize(self: object, merged: torch.Tensor) -> None:
        raise RuntimeError("injected during requantization")

    monkeypatch.setattr(bnb_io.FourBit, "quantize", failing_quantize)
    with pytest.raises(RuntimeError, match="injected"):
        safemerge.fuse(layer, adapter)
    assert_same_state(layer, before)


def test_small_deltas_vanish_and_the_report_says_so() -> None:
    layer = linear_4bit(16, 128, blocksize=64)
    # delta ~ 1e-11: below float32's resolution at each block's absmax, so neither a code
    # nor an absmax moves (a delta that moves only the absmax rescales the whole block).
    tiny = adapter_for(layer, size=1e-6)
    before = state_bits(layer)
    record = safemerge.fuse(layer, tiny)
    assert isinstance(record, QuantizedFuseRecord)
    assert (record.blocks, record.blocks_changed, record.elements_changed) == (32, 0, 0)
    assert record.output_error == pytest.approx(1.0, abs=0.05)  # the adapter's effect is lost whole
    assert "0 of 32 blocks changed" in record.summary()
    assert_same_state(layer, before)


def test_arithmetic_unfuse_is_not_an_inverse_here() -> None:
    layer = linear_4bit(16, 128)
    adapter = adapter_for(layer)
    original = layer.weight.data.clone()
    record = safemerge.fuse(layer, adapter)
    safemerge.unfuse(layer, record, exact=False)
    drifted = float((layer.weight.data != original).float().mean())
    # Measured, not hidden: subtracting and requantizing moves a share of the codes.
    assert 0.0 < drifted < 0.5
    with pytest.raises(safemerge.RestoreError):
        safemerge.unfuse(nn.Linear(3, 3), record)


@pytest.mark.skipif(
    not bnb_functional.has_avx512bf16(), reason="this CPU never repacks 4-bit weights"
)
def test_a_weight_repacked_for_the_cpu_kernel_is_read_in_its_own_layout() -> None:
    layer = linear_4bit(32, 128).eval()
    expected_weight = float32_twin(layer).weight.detach().clone()
    inputs = torch.randn(4, 128).bfloat16()
    with torch.no_grad():
        layer(inputs)  # one inference pass repacks the weight
    assert layer.weight.quant_state.packing_format_for_cpu
    repacked = float32_twin(layer).weight.detach()
    # The repacked absmax is bfloat16: equal up to its rounding, and nothing like garbage.
    assert bool(((repacked - expected_weight).abs() <= expected_weight.abs() * 2**-8 + 1e-12).all())
    adapter = adapter_for(layer)
    before = state_bits(layer)
    twin = nn.Linear(128, 32)
    twin.weight.data = repacked.clone()
    record = safemerge.fuse(layer, adapter)
    safemerge.fuse(twin, adapter)
    packed, _ = bnb_functional.quantize_4bit(twin.weight.detach(), blocksize=64, quant_type="nf4")
    assert torch.equal(layer.weight.data.view(torch.uint8), packed.view(torch.uint8))
    with torch.no_grad():
        assert torch.isfinite(layer(inputs)).all()  # still a working layer (it repacks again)
    safemerge.unfuse(layer, record)
    assert_same_state(layer, before)


def linear_8bit(
    out_features: int, in_features: int, *, threshold: float = 0.0, seed: int = 0
) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    bias = torch.randn(out_features, generator=generator) * 0.01
    return synthetic.quantized_linear(weight, "int8", threshold=threshold, bias=bias)


def int8_bits(layer: nn.Module) -> list[torch.Tensor | None]:
    weight, state = layer.weight, layer.state
    tensors = [
        weight.data,
        getattr(weight, "CB", None),
        getattr(weight, "SCB", None),
        state.CB,
        state.SCB,
        layer.bias,
    ]
    return [
        None if t is None else t.detach().clone().reshape(-1).view(torch.uint8) for t in tensors
    ]


def assert_same_int8(layer: nn.Module, before: list[torch.Tensor | None]) -> None:
    for now, then in zip(int8_bits(layer), before, strict=True):
        assert (now is None) == (then is None)
        assert now is None or torch.equal(now, then)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("after_inference", [False, True], ids=["SCB-on-weight", "SCB-in-state"])
def test_int8_fuse_requantizes_rows_within_their_bound(
    threshold: float, after_inference: bool
) -> None:
    layer = linear_8bit(24, 80, threshold=threshold)
    inputs = torch.randn(3, 80)
    if after_inference:
        with torch.no_grad():
            layer(inputs)  # moves CB and SCB into layer.state
        assert layer.weight.SCB is None and layer.state.SCB is not None
    adapter = adapter_for(layer)
    twin = float32_twin(layer)
    _, accumulated = safemerge.expected_fuse(twin, [(adapter, 1.0)])
    exact = twin.weight.detach().double() + adapter.scale * (
        adapter.lora_B.double() @ adapter.lora_A.double()
    )
    before = int8_bits(layer)

    record = safemerge.fuse(layer, adapter, name="down_proj")
    safemerge.fuse(twin, adapter)

    codes, scales, _ = bnb_functional.int8_vectorwise_quant(twin.weight.detach().half())
    assert torch.equal(layer.weight.data, codes)
    assert torch.equal(layer.state.SCB if after_inference else layer.weight.SCB, scales)
    fused = layer.weight.data.double() * scales.double()[:, None] / 127
    half = twin.weight.detach().half().double()
    row_bound = scales.double()[:, None] / 254 + (half - twin.weight.detach().double()).abs()
    assert bool(((fused - exact).abs() <= row_bound * (1 + 2**-20) + accumulated).all())
    assert isinstance(record, QuantizedFuseRecord) and 0.0 < record.worst_error_of_bound <= 1.0
    with torch.no_grad():  # still a working int8 layer, computing with the merged weight
        torch.testing.assert_close(
            layer(inputs), inputs @ fused.float().T + layer.bias, rtol=1e-4, atol=1e-4
        )
    safemerge.unfuse(layer, record)
    assert_same_int8(layer, before)


def test_int8_merge_overflowing_float16_is_refused() -> None:
    layer = linear_8bit(8, 16)
    adapter = LoraAdapter(torch.ones(1, 16), torch.full((8, 1), 70000.0))
    before = int8_bits(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        safemerge.fuse(layer, adapter, name="mlp")
    assert caught.value.dtype == torch.float16 and caught.value.overflow_count == 128
    assert_same_int8(layer, before)


@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_keeps_its_settings_and_works_for_more_fuses(
    compute_dtype: torch.dtype, weight_dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(24, 64, generator=generator) * 0.02).to(weight_dtype)
    layer = bnb.nn.Linear4bit(64, 24, bias=False, quant_type="fp4", compute_dtype=compute_dtype)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="fp4", blocksize=32)
    layer = layer.to("cpu")
    state_dtype = layer.weight.quant_state.dtype
    before = state_bits_without_bias(layer)
    first = safemerge.fuse(layer, adapter_for(layer, seed=1))
    second = safemerge.fuse(layer, adapter_for(layer, seed=2))
    assert layer.weight.quant_state.dtype == state_dtype
    assert (layer.weight.quant_state.blocksize, layer.weight.quant_state.quant_type) == (32, "fp4")
    with torch.no_grad():
        out = layer(torch.randn(2, 64).to(compute_dtype))
    assert out.dtype == compute_dtype and bool(torch.isfinite(out).all())
    with pytest.raises(safemerge.RestoreError, match="reverse order"):
        safemerge.unfuse(layer, first)
    safemerge.unfuse(layer, second)
    safemerge.unfuse(layer, first)
    assert all(
        torch.equal(a, b) for a, b in zip(state_bits_without_bias(layer), before, strict=True)
    )


def state_bits_without_bias(layer: nn.Module) -> list[torch.Tensor]:
    state = layer.weight.quant_state
    return [
        t.detach().clone().reshape(-1).view(torch.uint8) for t in (layer.weight.data, state.absmax)
    ]


def test_an_exception_during_int8_requantization_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safemerge.quant import bnb as bnb_io

    layer = linear_8bit(8, 16)
    before = int8_bits(layer)

    def failing_quantize(self: object, merged: torch.Tensor) -> None:
        raise KeyboardInterrupt("injected")

    monkeypatch.setattr(bnb_io.EightBit, "quantize", failing_quantize)
    with pytest.raises(KeyboardInterrupt):
        safemerge.fuse(layer, adapter_for(layer))
    assert_same_int8(layer, before)


def test_int8_layer_takes_further_fuses_and_refuses_nan() -> None:
    layer = linear_8bit(12, 40)
    before = int8_bits(layer)
    first = safemerge.fuse(layer, adapter_for(layer, seed=1))
    second = safemerge.fuse(layer, adapter_for(layer, seed=2))
    poisoned = adapter_for(layer, seed=3)
    poisoned.lora_A[0, -1] = float("nan")
    middle = int8_bits(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        safemerge.fuse(layer, poisoned)
    assert caught.value.nan_count > 0
    assert_same_int8(layer, middle)
    with torch.no_grad():
        assert bool(torch.isfinite(layer(torch.randn(2, 40))).all())
    safemerge.unfuse(layer, second)
    safemerge.unfuse(layer, first)
    assert_same_int8(layer, before)
