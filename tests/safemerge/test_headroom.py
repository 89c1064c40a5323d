"""safemerge.headroom: a layer it proves safe is never refused by the guard."""

from __future__ import annotations

import math

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import safemerge
from safemerge.merge.headroom import cannot_overflow, weight_magnitude
from safemerge.merge.request import coefficients
from safemerge.merge.view import view_layer

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PROVEN_SEEN: list[bool] = []


@st.composite
def layers_near_the_range(draw: st.DrawFn) -> tuple[torch.nn.Linear, safemerge.LoraAdapter, float]:
    dtype = draw(st.sampled_from(DTYPES))
    largest = float(torch.finfo(dtype).max)
    out_features, in_features, rank = (draw(st.integers(1, 12)) for _ in range(3))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    # A weight anywhere from tiny to right at the top of its dtype's range.
    weight_scale = largest * draw(st.sampled_from([1e-6, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0]))
    factor_scale = math.sqrt(largest) * draw(st.sampled_from([1e-9, 1e-3, 0.1, 0.5, 1.0, 2.0]))
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        values = torch.rand(out_features, in_features, generator=generator) * 2 - 1
        layer.weight.copy_((values * weight_scale).clamp(-largest, largest))
    layer.to(dtype)
    lora_A = torch.randn(rank, in_features, generator=generator) * factor_scale
    lora_B = torch.randn(out_features, rank, generator=generator) * factor_scale
    if draw(st.booleans()):
        lora_B.view(-1)[draw(st.integers(0, lora_B.numel() - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
    scale = draw(st.sampled_from([0.0, 1e-3, 0.5, 1.0, -2.0, 1e3]))
    return layer, safemerge.LoraAdapter(lora_A, lora_B), scale


@settings(deadline=None, max_examples=300)
@given(layers_near_the_range())
def test_a_proven_layer_is_never_refused(
    case: tuple[torch.nn.Linear, safemerge.LoraAdapter, float],
) -> None:
    layer, adapter, scale = case
    view = view_layer(layer)
    pairs = [(adapter, 1.0)]
    proven = cannot_overflow(
        view,
        pairs,
        coefficients(pairs, scale),
        magnitude=weight_magnitude(layer.weight),
        dtype=layer.weight.dtype,
    )
    PROVEN_SEEN.append(proven)
    try:
        safemerge.fuse(layer, adapter, scale=scale, exact_unfuse=False)
        refused = False
    except safemerge.NonFiniteMergeError:
        refused = True
    event(f"proven={proven} refused={refused}")
    assert not (proven and refused), "the bound proved a merge the guard refused"


def test_the_property_met_both_outcomes() -> None:
    """The generated cases include proven layers and refused ones (run after the property)."""
    test_a_proven_layer_is_never_refused()
    assert any(PROVEN_SEEN) and not all(PROVEN_SEEN)


def test_ordinary_layers_are_proven_and_broken_ones_are_not() -> None:
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    adapter = safemerge.LoraAdapter(torch.randn(8, 64) * 0.01, torch.randn(32, 8) * 0.01)
    view, pairs = view_layer(layer), [(adapter, 2.0)]
    magnitude = weight_magnitude(layer.weight)
    assert magnitude == float(layer.weight.detach().abs().max())
    assert cannot_overflow(
        view, pairs, coefficients(pairs, 1.0), magnitude=magnitude, dtype=torch.bfloat16
    )
    adapter.lora_A[0, 0] = math.nan
    assert not cannot_overflow(
        view, pairs, coefficients(pairs, 1.0), magnitude=magnitude, dtype=torch.bfloat16
    )
    dora = safemerge.LoraAdapter(torch.ones(8, 64), torch.ones(32, 8), magnitude=torch.ones(32))
    assert not cannot_overflow(
        view, [(dora, 1.0)], (1.0,), magnitude=magnitude, dtype=torch.bfloat16
    )
    # c * lora_B alone beyond float32 (the engine folds c into it), though the product
    # with a tiny lora_A is small.
    huge = safemerge.LoraAdapter(torch.full((1, 64), 1e-30), torch.full((32, 1), 1e30))
    assert not cannot_overflow(
        view, [(huge, 1.0)], (1e10,), magnitude=magnitude, dtype=torch.float32
    )
