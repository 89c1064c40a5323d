"""layer_cases: arguments checked before drawing, tags as asked, cases that stay pristine."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pytest_safemerge.implementations import layer_snapshot
from pytest_safemerge.layer_strategies import (
    ALL_TAGS,
    LAYER_TAGS,
    QUANTIZED_TAGS,
    LayerCase,
    kinds_for,
    layer_cases,
    options_for,
)
from pytest_safemerge.results import Row
from pytest_safemerge.suite.layer_contract import _assert_explored, cells

FEW = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"layer": "lstm"}, "layer='lstm' is not one of"),
        ({"layer": "linear", "kind": "overflow"}, "kind='overflow' is not one of"),
        ({"layer": "linear", "options": {"qlora"}}, "unknown tags ['qlora']"),
        ({"layer": "embedding", "options": {"lora-bias"}}, "do not fit layer='embedding'"),
        ({"layer": "embedding", "kind": "bias-overflow"}, "do not fit layer='embedding'"),
        ({"layer": "nf4", "options": {"dora"}}, "do not fit layer='nf4'"),
        ({"layer": "linear", "options": {"dora", "several"}}, "dora goes alone"),
        ({"layer": "linear", "kind": "cast-overflow", "options": {"dora"}}, "do not fit"),
        ({"layer": "conv2d", "allowed": {"linear"}}, "layer='conv2d' is not in allowed"),
    ],
)
def test_bad_arguments_are_refused_before_drawing(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        layer_cases(**arguments)


@st.composite
def asked(draw: st.DrawFn) -> tuple[str, str, frozenset[str], frozenset[str], LayerCase]:
    layer = draw(st.sampled_from(LAYER_TAGS))
    allowed = frozenset({layer, *draw(st.sets(st.sampled_from(sorted(options_for(layer)))))})
    kind = draw(st.sampled_from(kinds_for(layer, allowed)))
    case = draw(layer_cases(layer=layer, kind=kind, allowed=allowed))
    return layer, kind, allowed, frozenset(case.tags), case


@FEW
@given(asked())
def test_cases_carry_the_tags_asked_for(
    drawn: tuple[str, str, frozenset[str], frozenset[str], LayerCase],
) -> None:
    layer, kind, allowed, tags, case = drawn

    assert case.layer_tag == layer and case.kind == kind
    assert layer in tags and tags <= allowed <= ALL_TAGS
    assert ("several" in tags) == (len(case.adapters) > 1)
    assert ("dora" in tags) == any(a.magnitude is not None for a in case.adapters)
    assert ("lora-bias" in tags) == any(a.lora_bias is not None for a in case.adapters)
    assert not ({"dora"} < tags and tags & {"several", "lora-bias"})
    assert (type(case.layer).__name__ in ("Linear4bit", "Linear8bitLt")) == (
        layer in QUANTIZED_TAGS
    )
    assert case.must_refuse == (kind != "random")


@FEW
@given(layer_cases(layer="nf4", options={"lora-bias"}) | layer_cases(layer="conv3d"))
def test_fresh_copies_leave_the_case_pristine(case: LayerCase) -> None:
    before = layer_snapshot(case.layer)
    adapter_before = case.adapters[0].lora_A.clone()

    layer = case.fresh_layer()
    adapters = case.fresh_adapters()
    weight: Any = layer.weight
    weight.data.zero_()
    adapters[0].lora_A.add_(1.0)

    after = layer_snapshot(case.layer)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(case.adapters[0].lora_A, adapter_before)


def test_a_property_that_never_met_its_cases_fails() -> None:
    row = Row({"examples": 0, "kinds": {"random": 3}, "tags": {"linear": 3}})
    explored = cells(("random", "nan"), {"linear", "dora"})

    with pytest.raises(AssertionError, match=r"never met \['nan', 'dora'\]"):
        _assert_explored(row, explored, ("random", "nan"))
