"""The PEFT model contract, as a class to subclass: PEFT's model-level merge entry points
on tiny generated models, one cell per property, layer kind and weight dtype.

``pytest --safemerge-peft`` collects it against the installed PEFT. Each cell builds
models of its layer kind (beside a Linear) in its dtype, with randomized configs (see
:mod:`.configs`), and checks one property of ``merge_adapter``, ``unmerge_adapter``,
``merge_and_unload``, ``delete_adapter`` or ``add_weighted_adapter`` against the float64
oracle (:mod:`.oracle`). A cell this PEFT cannot run (a layer kind, an entry point or a
combination type it lacks) is skipped with the reason, naming the release.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import event, note
from hypothesis import strategies as st

from pytest_safemerge.options import Settings
from pytest_safemerge.peft_suite import features
from pytest_safemerge.peft_suite.configs import ModelCase, model_cases
from pytest_safemerge.peft_suite.model_checks import CHECKS
from pytest_safemerge.peft_suite.models import KINDS
from pytest_safemerge.results import Row, start_row
from pytest_safemerge.suite import runner

__all__ = ["MODEL_CELLS", "MODEL_PROPERTY_NAMES", "PeftModelSuite", "case_strategy"]

#: The summary's name of each property.
MODEL_PROPERTY_NAMES = {
    "test_merge_adapter_is_accurate": "merge accuracy",
    "test_merge_adapter_twice_is_once": "merge twice",
    "test_unmerge_adapter_round_trip": "unmerge round trip",
    "test_merge_and_unload_equals_merge_adapter": "merge_and_unload",
    "test_delete_merged_adapter": "delete merged",
    "test_weighted_adapter_reproduces_one_adapter": "weighted reproduces",
    "test_weighted_cat_is_the_weighted_sum": "weighted cat",
    "test_refused_merge_leaves_model_unchanged": "refusal atomicity",
}
#: The entry point each property calls (its cell skips where PEFT lacks it).
_ENTRY_POINT = {
    "merge accuracy": "merge_adapter",
    "merge twice": "merge_adapter",
    "unmerge round trip": "unmerge_adapter",
    "merge_and_unload": "merge_and_unload",
    "delete merged": "delete_adapter",
    "weighted reproduces": "add_weighted_adapter",
    "weighted cat": "add_weighted_adapter",
    "refusal atomicity": "merge_and_unload",
}
MODEL_DTYPES = ("float32", "float16", "bfloat16")
#: Weights the cat combination is checked at (1 for "the adapters active together").
_CAT_WEIGHTS = (1.0, 0.5, -0.75, 2.0, 1.0)


@dataclass(frozen=True)
class ModelCell:
    kind: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.dtype}"


MODEL_CELLS = tuple(ModelCell(kind, dtype) for kind in KINDS for dtype in MODEL_DTYPES)


def case_strategy(prop: str, kind: str, dtype: torch.dtype) -> st.SearchStrategy[ModelCase]:
    """The generated cases of one property on one layer kind and dtype."""
    if prop == "weighted cat":
        cases = model_cases(kind, dtype, least_adapters=2, dora=False)
        planted = st.fixed_dictionaries(
            {"weights": st.lists(st.sampled_from(_CAT_WEIGHTS), min_size=3, max_size=3)}
        )
    elif prop == "weighted reproduces":
        cases = model_cases(kind, dtype)
        planted = st.fixed_dictionaries({"combination": st.sampled_from(features.combination_types())})
    elif prop == "refusal atomicity":
        cases = model_cases(kind, dtype)
        planted = st.fixed_dictionaries(
            {
                "tensor": st.sampled_from(["A", "B"]),
                "value": st.sampled_from([float("nan"), float("inf"), float("-inf")]),
                "position": st.integers(0, 10**6),
            }
        )
    else:
        return model_cases(kind, dtype)
    return st.builds(_planted, cases, planted)


def _planted(case: ModelCase, planted: dict[str, Any]) -> ModelCase:
    case.planted.update(planted)
    return case


def cell_skip_reason(prop: str, cell: ModelCell) -> str | None:
    """Why the cell does not run on the installed PEFT, or None."""
    reason = features.entry_point_missing(_ENTRY_POINT[prop]) or features.kind_unsupported(cell.kind)
    if reason is None and prop == "weighted cat" and "cat" not in features.combination_types():
        reason = f"PEFT {features.peft_version()}'s add_weighted_adapter has no cat"
    return reason


@pytest.mark.parametrize("model_cell", MODEL_CELLS, ids=[cell.id for cell in MODEL_CELLS])
class PeftModelSuite:
    """The properties PEFT's model-level merge entry points must have, one cell per
    property, layer kind and dtype (``test_merge_adapter_is_accurate[conv2d-float16]``)."""

    @pytest.fixture
    def explore(
        self, request: pytest.FixtureRequest, safemerge_settings: Settings, model_cell: ModelCell
    ) -> Callable[[], None]:
        pytest.importorskip("peft")
        prop = MODEL_PROPERTY_NAMES[request.node.originalname]
        row = start_row(
            request.node,
            contract="peft model",
            prop=prop,
            target=f"peft {features.peft_version()}",
            dtype=model_cell.dtype,
            kind=model_cell.kind,
        )
        row.data["tags"] = {}
        reason = cell_skip_reason(prop, model_cell)
        if reason is not None:
            pytest.skip(reason)
        active = sum(cell_skip_reason(prop, c) is None for c in MODEL_CELLS)
        check = CHECKS[prop]

        def check_one(case: ModelCase) -> None:
            _record(row, case)
            note(case.describe())
            check(case, row)

        def run() -> None:
            runner.explore(
                name=f"{request.node.originalname}__{model_cell.id}",
                row=row,
                strategies={"random": case_strategy(prop, model_cell.kind, getattr(torch, model_cell.dtype))},
                known={},
                examples_per_kind=runner.budget(safemerge_settings.examples, active, 1, least=1),
                check=check_one,
                must_see=("random",),
            )

        return run

    def test_merge_adapter_is_accurate(self, explore: Any) -> None:
        """Every merged weight and bias is within its bound of the float64 oracle, and the
        merged model's forward equals the adapter-active one within both forwards' bounds."""
        explore()

    def test_merge_adapter_twice_is_once(self, explore: Any) -> None:
        """A second merge_adapter leaves every bit as the first did."""
        explore()

    def test_unmerge_adapter_round_trip(self, explore: Any) -> None:
        """unmerge_adapter restores the original weights within both merges' bounds."""
        explore()

    def test_merge_and_unload_equals_merge_adapter(self, explore: Any) -> None:
        """merge_and_unload writes the same bits as merge_adapter."""
        explore()

    def test_delete_merged_adapter(self, explore: Any) -> None:
        """Deleting a merged adapter leaves no delta behind, or refuses and changes nothing."""
        explore()

    def test_weighted_adapter_reproduces_one_adapter(self, explore: Any) -> None:
        """add_weighted_adapter([a], [1.0]) is ``a`` (its scale, lora_bias and DoRA
        magnitude included), whatever the combination type."""
        explore()

    def test_weighted_cat_is_the_weighted_sum(self, explore: Any) -> None:
        """add_weighted_adapter(combination_type="cat") is the weighted sum of the adapters."""
        explore()

    def test_refused_merge_leaves_model_unchanged(self, explore: Any) -> None:
        """merge_and_unload(safe_merge=True) refuses an adapter holding NaN or Inf and leaves
        every weight of the model as it was."""
        explore()


def _record(row: Row, case: ModelCase) -> None:
    row.example("random")
    tags = row.data["tags"]
    for tag in sorted(case.tags):
        tags[tag] = tags.get(tag, 0) + 1
    event(f"options: {', '.join(sorted(case.tags)) or 'none'}")
