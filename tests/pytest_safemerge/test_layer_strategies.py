"""layer_cases: arguments checked before drawing, tags, dtypes and 4-bit shapes as asked,
cases that stay pristine."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pytest_safemerge.implementations import layer_snapshot
from pytest_safemerge.layer_strategies import (
    ADAPTER_DTYPES,
    ALL_TAGS,
    LAYER_DTYPES,
    LAYER_TAGS,
    QUANTIZED_TAGS,
    UNQUANTIZED_TAGS,
    LayerCase,
    kinds_for,
    layer_cases,
    options_for,
    rows_are_whole_blocks,
)
from pytest_safemerge.results import Row
from pytest_safemerge.suite.layer_contract import _assert_explored, runs

FEW = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
#: For find(): the first example found will do (shrinking it costs more than finding it).
SEARCH = settings(database=None, max_examples=200, phases=[Phase.generate])


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
        (
            {"layer": "linear", "dtype": torch.float8_e4m3fn},
            "dtype=torch.float8_e4m3fn is not one of float32, float16, bfloat16; pass one",
        ),
        ({"layer": "conv1d", "dtype": "float64"}, "dtype='float64' is not one of float32"),
        (
            {"layer": "nf4", "dtype": torch.float16},
            "dtype=torch.float16 does not apply to layer='nf4': a quantized layer's weight is "
            "its nf4 quantization, and its bias dtype is drawn; pass dtype=None",
        ),
        ({"layer": "int8", "dtype": "float32"}, "dtype='float32' does not apply to layer='int8'"),
        (
            {"layer": "linear", "adapter_dtype": torch.int8},
            "adapter_dtype=torch.int8 is not one of float32, float16, bfloat16",
        ),
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
    planned = runs(("random", "nan"), "linear", {"linear", "dora"})
    no_dora = Row({"examples": 4, "kinds": {"random": 3, "nan": 1}, "tags": {"linear": 4}})
    no_nan = Row({"examples": 4, "kinds": {"random": 4}, "tags": {"linear": 4, "dora": 2}})

    with pytest.raises(AssertionError, match=r"never met the options \['dora'\]"):
        _assert_explored(no_dora, planned, ("random", "nan"))
    with pytest.raises(AssertionError, match=r"never met the case kinds \['nan'\]"):
        _assert_explored(no_nan, planned, ("random", "nan"))


# --- dtypes -------------------------------------------------------------------------------------


@st.composite
def one_cell(draw: st.DrawFn) -> tuple[torch.dtype, LayerCase]:
    """A case of one cell (unquantized layer kind x weight dtype), as a runner asks for it."""
    layer = draw(st.sampled_from(UNQUANTIZED_TAGS))
    dtype = draw(st.sampled_from(LAYER_DTYPES))
    kind = draw(st.sampled_from(kinds_for(layer)))
    name = draw(st.booleans())  # the dtype, or its name
    wanted = str(dtype).removeprefix("torch.") if name else dtype
    return dtype, draw(layer_cases(layer=layer, kind=kind, dtype=wanted))


@FEW
@given(one_cell())
def test_dtype_is_the_weight_dtype_of_the_cell(drawn: tuple[torch.dtype, LayerCase]) -> None:
    dtype, case = drawn

    assert case.layer.weight.dtype == dtype
    bias = getattr(case.layer, "bias", None)
    assert bias is None or bias.dtype == dtype


def _adapter_tensors(case: LayerCase) -> list[torch.Tensor]:
    return [
        tensor
        for adapter in case.adapters
        for tensor in (adapter.lora_A, adapter.lora_B, adapter.lora_bias, adapter.magnitude)
        if tensor is not None
    ]


@st.composite
def with_adapter_dtype(draw: st.DrawFn) -> tuple[torch.dtype, LayerCase]:
    layer = draw(st.sampled_from(LAYER_TAGS))
    kind = draw(st.sampled_from(kinds_for(layer)))
    dtype = draw(st.sampled_from(ADAPTER_DTYPES))
    options = (
        draw(st.sampled_from(sorted(options_for(layer) - {"several"})))
        if kind == "random"
        else None
    )
    case = draw(
        layer_cases(
            layer=layer, kind=kind, adapter_dtype=dtype, options=[options] if options else ()
        )
    )
    return dtype, case


@FEW
@given(with_adapter_dtype())
def test_adapter_dtype_is_every_adapter_tensors_dtype(drawn: tuple[torch.dtype, LayerCase]) -> None:
    dtype, case = drawn

    assert {tensor.dtype for tensor in _adapter_tensors(case)} == {dtype}
    if case.kind in ("random", "cast-overflow", "bias-overflow"):
        # The planted values fit the adapter's dtype: nothing overflowed on the way in.
        assert all(bool(torch.isfinite(tensor).all()) for tensor in _adapter_tensors(case))


@pytest.mark.parametrize("dtype", ADAPTER_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "cast-overflow", "bias-overflow"])
def test_adapter_dtypes_are_drawn(kind: str, dtype: torch.dtype) -> None:
    # Without adapter_dtype, each of float32, float16 and bfloat16 comes up, on any weight.
    def one_adapter_of(case: LayerCase) -> bool:
        return any(adapter.lora_A.dtype == dtype for adapter in case.adapters)

    case = find(
        layer_cases(layer="linear", kind=kind, dtype=torch.float32),
        one_adapter_of,
        settings=SEARCH,
    )
    assert case.layer.weight.dtype == torch.float32


# --- 4-bit shapes -------------------------------------------------------------------------------


def _four_bit_shape(case: LayerCase) -> tuple[int, int, int]:
    weight: Any = case.layer.weight
    state = weight.quant_state
    return int(state.shape[0]), int(state.shape[1]), int(state.blocksize)


@pytest.mark.parametrize("layer", ["nf4", "fp4"])
def test_four_bit_layers_have_rows_of_whole_blocks_and_rows_narrower_than_one(layer: str) -> None:
    # bitsandbytes' CPU dequantize_4bit is wrong for blocks that straddle rows: rows of
    # whole blocks (as real layers have) keep such a bug from deciding every 4-bit result,
    # and narrow rows keep it in sight.
    aligned = find(layer_cases(layer=layer), rows_are_whole_blocks, settings=SEARCH)
    narrow = find(
        layer_cases(layer=layer), lambda case: not rows_are_whole_blocks(case), settings=SEARCH
    )
    several_blocks = find(
        layer_cases(layer=layer),
        lambda case: (
            _four_bit_shape(case)[0] > 1
            and _four_bit_shape(case)[1] >= 2 * _four_bit_shape(case)[2]
        ),
        settings=SEARCH,
    )

    out_features, in_features, blocksize = _four_bit_shape(aligned)
    assert in_features % blocksize == 0 and in_features <= 128 and out_features <= 4
    out_features, in_features, blocksize = _four_bit_shape(narrow)
    assert in_features < blocksize and (out_features * in_features) % blocksize == 0
    assert rows_are_whole_blocks(several_blocks)


def test_four_bit_shapes_are_drawn_about_half_and_half() -> None:
    # Statistics over one derandomized run of 60 cases: both kinds of shape, each often.
    seen: dict[bool, int] = {True: 0, False: 0}

    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @given(layer_cases(layer="nf4"))
    def count(case: LayerCase) -> None:
        seen[rows_are_whole_blocks(case)] += 1

    count()
    assert seen[True] >= 15 and seen[False] >= 15, seen
