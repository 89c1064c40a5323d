"""The layer suite's bounds: one adapter's is exactly safemerge.expected_fuse's, a merge in
steps needs the composed bound, the bias bound is the arithmetic's, and the generated
cases are what they claim (random ones fit their dtypes, refused ones surely do not)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import safemerge
from pytest_safemerge.layer_bounds import expected_layer_fuse
from pytest_safemerge.layer_strategies import (
    ALL_TAGS,
    LAYER_TAGS,
    QUANTIZED_TAGS,
    UNQUANTIZED_TAGS,
    LayerCase,
    layer_cases,
)
from safemerge.merge.numerics import FLOAT32_RANGE_LIMIT

FEW = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@st.composite
def any_layer_cases(draw: st.DrawFn, layers: tuple[str, ...], kinds: tuple[str, ...]) -> LayerCase:
    layer = draw(st.sampled_from(layers))
    kind = draw(st.sampled_from(kinds))
    if kind == "bias-overflow" and layer == "embedding":
        kind = "cast-overflow"
    return draw(layer_cases(layer=layer, kind=kind))


ONE_ADAPTER = ALL_TAGS - {"several"}


@FEW
@given(
    layer_cases(layer="linear", options={"dora"}, allowed=ONE_ADAPTER)
    | layer_cases(layer="conv2d", options={"lora-bias"}, allowed=ONE_ADAPTER)
    | layer_cases(layer="embedding", allowed=ONE_ADAPTER)
    | layer_cases(layer="fan_in_fan_out", options={"dora"}, allowed=ONE_ADAPTER)
)
def test_one_adapter_has_exactly_the_bound_of_expected_fuse(case: LayerCase) -> None:
    (adapter,) = case.adapters
    expected = expected_layer_fuse(case.layer, case.adapters, case.scale)
    reference, bound = safemerge.expected_fuse(case.layer, [(adapter, 1.0)], scale=case.scale)

    assert torch.equal(expected.weight.reference, reference)
    assert torch.equal(expected.weight.bound, bound)


def test_a_merge_in_steps_needs_the_composed_bound() -> None:
    # float16 near 1 has ulps of 2**-10. Two deltas of 0.5 ulp + 2**-20 each: merged at
    # once, 1 + 1 ulp + 2**-19 rounds to 1 + 1 ulp; one at a time, the first rounds up to
    # 1 + 1 ulp and the second again, to 1 + 2 ulps: off by a whole ulp, twice the one
    # rounding expected_fuse allows, and within the bound of two merges.
    layer = nn.Linear(1, 1, bias=False).half()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    step = 2.0**-11 + 2.0**-20
    adapters = [
        safemerge.LoraAdapter(torch.tensor([[step]]), torch.tensor([[1.0]])) for _ in range(2)
    ]
    first = (layer.weight.detach().float() + step).half()
    in_steps = (first.float() + step).half()

    _, at_once = safemerge.expected_fuse(layer, [(a, 1.0) for a in adapters], scale=1.0)
    expected = expected_layer_fuse(layer, adapters, 1.0)
    error = (in_steps.double() - expected.weight.reference).abs()
    assert float(in_steps.detach()) == 1.0 + 2 * 2.0**-10
    assert bool((error > at_once).all())
    assert bool((error <= expected.weight.bound).all())


def test_the_bias_bound_is_float32_multiply_adds_and_one_cast() -> None:
    layer = nn.Linear(1, 1).half()
    with torch.no_grad():
        layer.bias.fill_(1.0)
    adapter = safemerge.LoraAdapter(
        torch.ones(1, 1), torch.ones(1, 1), alpha=0.5, lora_bias=torch.tensor([3.0])
    )
    expected = expected_layer_fuse(layer, [adapter], 1.0)

    assert expected.bias is not None
    # One term: gamma_3 of |1| + |0.5 * 3|, the roundings' underflow floor, and half an
    # ulp of float16 at 2.5 (2**-10).
    u = 2.0**-24
    accumulated = 3 * u / (1 - 3 * u) * 2.5 + 3 * 2.0**-149
    assert float(expected.bias.reference) == 2.5
    assert float(expected.bias.bound) == accumulated + 2.0**-10


@FEW
@given(any_layer_cases(LAYER_TAGS, ("random",)))
def test_random_cases_fit_their_dtypes(case: LayerCase) -> None:
    # So that "a finite merge is not refused" applies to every one of them.
    assert expected_layer_fuse(case.layer, case.adapters, case.scale).fits()


@FEW
@given(any_layer_cases(UNQUANTIZED_TAGS, ("cast-overflow", "bias-overflow")))
def test_overflow_cases_overflow_whatever_the_rounding_order(case: LayerCase) -> None:
    # Every correct merge, in any order, has a float32 value before its last cast at or
    # beyond the limit: the bound less the last cast's half ulp (at least that at
    # |reference|) is how far that value can be from the reference.
    expected = expected_layer_fuse(case.layer, case.adapters, case.scale)
    tensor = expected.weight if case.kind == "cast-overflow" else expected.bias
    assert tensor is not None
    dtype = case.layer.weight.dtype if case.kind == "cast-overflow" else case.layer.bias.dtype
    last_cast = safemerge.numerics.ulp(tensor.reference, dtype) / 2
    if dtype == torch.float32:
        last_cast = torch.zeros_like(last_cast)
    before_cast = tensor.bound - last_cast
    assert bool(((tensor.reference.abs() - before_cast) >= tensor.limit).any())


@FEW
@given(any_layer_cases(QUANTIZED_TAGS, ("cast-overflow",)))
def test_quantized_overflow_cases_are_far_past_the_limit(case: LayerCase) -> None:
    # Requantizing keeps a block's largest element within its nested absmax's error (a
    # percent or so): the exact merge is at least 5% of the room past float16's limit
    # (int8), or a fifth of float32's max past float32's.
    layer: Any = case.layer
    shape = (layer.out_features, layer.in_features)
    values, _ = safemerge.quantization_bound(layer, torch.zeros(shape))
    exact = values.double()
    for adapter in case.adapters:
        exact = exact + case.scale * adapter.scale * (
            adapter.lora_B.double() @ adapter.lora_A.double()
        )
    limit = 65520.0 if case.layer_tag == "int8" else FLOAT32_RANGE_LIMIT
    ceiling = float(torch.finfo(torch.float32).max)
    margin = 0.05 * (min(4 * limit, ceiling) - limit) if case.layer_tag == "int8" else limit / 5
    assert float(exact.abs().max()) >= limit + margin


@pytest.mark.parametrize("kind", ["nan", "+inf", "-inf"])
def test_planted_values_are_in_an_adapter(kind: str) -> None:
    value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}[kind]

    @FEW
    @given(any_layer_cases(LAYER_TAGS, (kind,)))
    def planted(case: LayerCase) -> None:
        tensors = [
            tensor
            for adapter in case.adapters
            for tensor in (adapter.lora_A, adapter.lora_B, adapter.lora_bias, adapter.magnitude)
            if tensor is not None
        ]
        if math.isnan(value):
            assert any(bool(torch.isnan(t).any()) for t in tensors)
        else:
            assert any(bool((t == value).any()) for t in tensors)

    planted()


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_adapters_are_taken_as_they_are(adapter_dtype: torch.dtype) -> None:
    # The reference is the float64 merge of the adapter's values as given (exact in
    # float32, where the merge upcasts them): a correct merge of a float32 layer is within
    # the bound, and one whose product B @ A is computed in the adapter's dtype is not.
    layer = nn.Linear(64, 4, bias=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 64, generator=generator))
    lora_A = (torch.randn(8, 64, generator=generator) / 8).to(adapter_dtype)
    lora_B = torch.randn(4, 8, generator=generator).to(adapter_dtype)
    adapter = safemerge.LoraAdapter(lora_A, lora_B, alpha=16.0)
    expected = expected_layer_fuse(layer, [adapter], 0.5)

    exact = layer.weight.double() + 0.5 * 2.0 * (lora_B.double() @ lora_A.double())
    assert torch.equal(expected.weight.reference, exact)
    weight = layer.weight.detach()
    upcast = weight + 0.5 * 2.0 * (lora_B.float() @ lora_A.float())
    in_adapter_dtype = weight + (0.5 * 2.0 * lora_B @ lora_A).float()
    assert bool(((upcast.double() - exact).abs() <= expected.weight.bound).all())
    assert not bool(((in_adapter_dtype.double() - exact).abs() <= expected.weight.bound).all())


@FEW
@given(
    any_layer_cases(UNQUANTIZED_TAGS, ("random",)).filter(
        lambda case: any(adapter.lora_A.dtype != torch.float32 for adapter in case.adapters)
    )
)
def test_the_reference_is_the_adapters_values_as_given(case: LayerCase) -> None:
    # No adapter is rounded to float32 or to the weight's dtype on the way to the reference.
    doubled = [
        replace(
            adapter,
            lora_A=adapter.lora_A.double(),
            lora_B=adapter.lora_B.double(),
            lora_bias=None if adapter.lora_bias is None else adapter.lora_bias.double(),
            magnitude=None if adapter.magnitude is None else adapter.magnitude.double(),
        )
        for adapter in case.adapters
    ]
    as_given = expected_layer_fuse(case.layer, case.adapters, case.scale)
    widened = expected_layer_fuse(case.layer, doubled, case.scale)

    assert torch.equal(as_given.weight.reference, widened.weight.reference)
    if as_given.bias is not None:
        assert widened.bias is not None
        assert torch.equal(as_given.bias.reference, widened.bias.reference)
