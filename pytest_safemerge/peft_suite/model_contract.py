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
#: The fewest examples each run of a cell (one kind of case) gets.
_LEAST_PER_RUN = 1
#: The adapter options add_weighted_adapter's cells check one kind of case each.
WEIGHTED_OPTIONS = ("rslora", "lora_bias", "dora")
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


def case_kinds(prop: str, kind: str) -> tuple[str, ...]:
    """The kinds of case one cell runs, each with its share of the examples: ``random``;
    for add_weighted_adapter, ``plain`` (none of :data:`WEIGHTED_OPTIONS`) and one kind
    per such option this PEFT supports on the layer kind, so that each option's verdict
    is its own (one broken option never hides how the others fare)."""
    if prop not in ("weighted reproduces", "weighted cat"):
        return ("random",)
    supported = [
        option
        for option in WEIGHTED_OPTIONS
        if features.option_unsupported(kind, option) is None
        # cat combines several adapters, and DoRA adapters are drawn alone (see .configs)
        and not (prop == "weighted cat" and option == "dora")
    ]
    return ("plain", *supported)


def case_strategy(
    prop: str, kind: str, dtype: torch.dtype, case_kind: str = "random"
) -> st.SearchStrategy[ModelCase]:
    """The generated cases of one property on one layer kind and dtype (of one kind of
    case, :func:`case_kinds`)."""
    options: dict[str, Any] = {}
    if case_kind == "plain":
        options["excluded"] = frozenset(WEIGHTED_OPTIONS)
    elif case_kind != "random":
        options["required"] = case_kind
        options["excluded"] = frozenset(WEIGHTED_OPTIONS) - {case_kind}
    planted: st.SearchStrategy[dict[str, Any]]
    if prop == "weighted cat":
        cases = model_cases(kind, dtype, least_adapters=2, dora=False, **options)
        planted = st.fixed_dictionaries(
            {"weights": st.lists(st.sampled_from(_CAT_WEIGHTS), min_size=3, max_size=3)}
        )
    elif prop == "weighted reproduces":
        cases = model_cases(kind, dtype, **options)
        planted = st.fixed_dictionaries(
            {"combination": st.sampled_from(features.combination_types())}
        )
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
        cases, planted = model_cases(kind, dtype), st.just({})
    return st.builds(_planted, cases, planted, st.just(case_kind))


def _planted(case: ModelCase, planted: dict[str, Any], case_kind: str) -> ModelCase:
    case.planted.update(planted, case_kind=case_kind)
    return case


def cell_skip_reason(prop: str, cell: ModelCell) -> str | None:
    """Why the cell does not run on the installed PEFT, or None."""
    refused = None if features.kind_crash(cell.kind) else features.kind_unsupported(cell.kind)
    reason = features.entry_point_missing(_ENTRY_POINT[prop]) or refused
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

        kinds = case_kinds(prop, model_cell.kind)
        dtype = getattr(torch, model_cell.dtype)

        def run() -> None:
            # A layer kind PEFT crashes on cannot be built: the cell fails with the crash.
            kind_crash = features.kind_crash(model_cell.kind)
            if kind_crash is not None:
                row.note(kind_crash)
                raise AssertionError(f"[{prop}] {kind_crash}")
            # Tiny tensors: a thread pool costs more than it gains (three times the time
            # on two shared cores), so the cell runs on one thread and restores the count.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                explore_cell()
            finally:
                torch.set_num_threads(threads)
            # An option PEFT crashes on was left out of the cases (see .features); the
            # cell still fails with the crash, after every other case ran.
            crashes = [features.option_crash(model_cell.kind, o) for o in features.OPTIONS]
            found = [crash for crash in crashes if crash is not None]
            if found:
                row.note("; ".join(found))
                raise AssertionError(f"[{prop}] " + "; ".join(found))

        def explore_cell() -> None:
            runner.explore(
                name=f"{request.node.originalname}__{model_cell.id}",
                row=row,
                strategies={
                    kind: case_strategy(prop, model_cell.kind, dtype, kind) for kind in kinds
                },
                known={},
                examples_per_kind=runner.budget(
                    safemerge_settings.examples, active, len(kinds), least=_LEAST_PER_RUN
                ),
                check=check_one,
                must_see=kinds,
                # A case is a model build: shrinking would rebuild one per attempt, and
                # the failure already prints the case whole.
                shrink=False,
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
    row.example(case.planted.get("case_kind", "random"))
    tags = row.data["tags"]
    for tag in sorted(case.tags):
        tags[tag] = tags.get(tag, 0) + 1
    event(f"options: {', '.join(sorted(case.tags)) or 'none'}")
