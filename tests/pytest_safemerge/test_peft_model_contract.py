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

pytest.importorskip("peft")
pytest.importorskip("transformers")

from pytest_safemerge.peft_suite import features
from pytest_safemerge.peft_suite.configs import AdapterSpec, ModelCase, model_cases
from pytest_safemerge.peft_suite.model_checks import CHECKS
from pytest_safemerge.peft_suite.model_contract import case_strategy
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
