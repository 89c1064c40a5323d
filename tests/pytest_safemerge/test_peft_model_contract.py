"""The PEFT model contract generates what it claims, passes where PEFT is right, and fails
where a merge entry point is broken (power).

The checks are called directly on generated cases (no subprocess): each takes a
:class:`ModelCase` and a report row, as the contract's runner does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("peft")
pytest.importorskip("transformers")

from pytest_safemerge.peft_suite import features
from pytest_safemerge.peft_suite.configs import (
    AdapterSpec,
    ModelCase,
    adapter_tensors,
    lora_layers,
    model_cases,
)
from pytest_safemerge.peft_suite.model_checks import CHECKS
from pytest_safemerge.peft_suite.model_contract import WEIGHTED_OPTIONS, case_kinds, case_strategy
from pytest_safemerge.results import Row


def _row() -> Row:
    return Row({"examples": 0, "worst_fraction": None, "kinds": {}, "message": "", "status": None})


def test_the_configs_meet_every_option_peft_supports() -> None:
    """Every option (rsLoRA, lora_bias, DoRA, rank_pattern, alpha_pattern), several
    adapters and alpha != r are generated on a linear model."""
    seen: set[str] = set()
    alphas_equal_ranks: list[bool] = []

    @settings(max_examples=60, database=None, deadline=None)
    @given(model_cases("linear", torch.float32))
    def collect(case: ModelCase) -> None:
        seen.update(case.tags)
        alphas_equal_ranks.extend(a.alpha == a.r for a in case.adapters)

    collect()
    supported = {o for o in features.OPTIONS if features.option_unsupported("linear", o) is None}
    assert supported | {"several"} <= seen, f"never generated: {sorted(supported - seen)}"
    assert not any(alphas_equal_ranks)


def test_every_combination_type_and_planted_value_is_generated() -> None:
    combinations: set[str] = set()
    planted: set[str] = set()

    @settings(max_examples=300, database=None, deadline=None)
    @given(
        case_strategy("weighted reproduces", "linear", torch.float32),
        case_strategy("refusal atomicity", "linear", torch.float32),
    )
    def collect(weighted: ModelCase, refused: ModelCase) -> None:
        combinations.add(weighted.planted["combination"])
        planted.add(f"{refused.planted['tensor']}:{refused.planted['value']}")

    collect()
    assert combinations == set(features.combination_types())
    assert {"A:nan", "B:inf", "A:-inf"} <= planted


def _case(**options: Any) -> ModelCase:
    spec = AdapterSpec("a", 2, 3.0, frozenset(options.get("options", ())))
    return ModelCase("linear", torch.float32, (spec,), seed=3, spread=0.5)


@pytest.mark.parametrize(
    "prop", ["merge accuracy", "merge twice", "unmerge round trip", "merge_and_unload"]
)
def test_the_contract_passes_where_peft_is_right(prop: str) -> None:
    row = _row()
    CHECKS[prop](_case(), row)
    assert row.data["worst_fraction"] is not None and row.data["worst_fraction"] <= 1.0


def test_a_merge_without_its_scaling_fails_merge_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Power: a merge entry point that forgets the adapter's scale is caught by the
    weight oracle."""
    from peft.tuners.lora import layer as lora_layer

    original = lora_layer.Linear.get_delta_weight

    def unscaled(self: Any, adapter: str) -> torch.Tensor:
        return original(self, adapter) / self.scaling[adapter]

    monkeypatch.setattr(lora_layer.Linear, "get_delta_weight", unscaled)
    with pytest.raises(AssertionError, match=r"\[merge accuracy\] the weight of first"):
        CHECKS["merge accuracy"](_case(), _row())


def test_a_second_merge_that_adds_again_fails_merge_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import layer as lora_layer

    original = lora_layer.Linear.merge

    def again(self: Any, *args: Any, **kwargs: Any) -> None:
        self.merged_adapters.clear()
        original(self, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "merge", again)
    with pytest.raises(AssertionError, match=r"\[merge twice\] a second merge_adapter changed"):
        CHECKS["merge twice"](_case(), _row())


def test_an_unmerge_that_does_nothing_fails_the_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lora import layer as lora_layer

    monkeypatch.setattr(lora_layer.Linear, "unmerge", lambda self: None)
    with pytest.raises(AssertionError, match=r"\[unmerge round trip\] the weight of first"):
        CHECKS["unmerge round trip"](_case(), _row())


def test_each_weighted_kind_of_case_isolates_its_option() -> None:
    """add_weighted_adapter's cells run one kind of case per option (plain: none of them),
    so that each option's verdict is its own; the option is on the combined adapter."""
    kinds = case_kinds("weighted reproduces", "linear")
    assert kinds == ("plain", *WEIGHTED_OPTIONS)
    assert "dora" not in case_kinds("weighted cat", "linear")  # several adapters: no DoRA
    assert case_kinds("merge accuracy", "linear") == ("random",)
    seen: dict[str, set[frozenset[str]]] = {kind: set() for kind in kinds}

    @settings(max_examples=15, database=None, deadline=None)
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        for kind in kinds:
            case = data.draw(case_strategy("weighted reproduces", "linear", torch.float32, kind))
            assert case.planted["case_kind"] == kind
            seen[kind].add(case.adapters[0].options & set(WEIGHTED_OPTIONS))
            for adapter in case.adapters[1:]:
                assert not adapter.options & (set(WEIGHTED_OPTIONS) - {kind})

    collect()
    assert seen["plain"] == {frozenset()}
    assert all(seen[option] == {frozenset({option})} for option in WEIGHTED_OPTIONS)


def test_a_multihead_attention_in_proj_lora_bias_is_not_part_of_the_adapter() -> None:
    """PEFT never applies the in_proj's lora bias (merge and forward alike): the contract
    leaves it at its initial zero, and the in_proj_bias must not change."""
    spec = AdapterSpec("a", 2, 3.0, frozenset({"lora_bias"}))
    case = ModelCase("multihead_attention", torch.float32, (spec,), seed=1, spread=0.5)
    layer = lora_layers(case.build())["layer"]
    assert "bias" not in adapter_tensors(layer, "a")
    assert not layer.lora_B["a"].bias.any()
    row = _row()
    CHECKS["unmerge round trip"](case, row)  # in_proj and out_proj, weights and biases
    assert row.data["worst_fraction"] is not None and row.data["worst_fraction"] <= 1.0
