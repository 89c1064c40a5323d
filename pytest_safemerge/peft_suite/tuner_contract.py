"""The tuner contract: every PEFT tuner other than LoRA that merges, against the installed
PEFT, as a class to subclass.

``pytest --safemerge-peft`` collects it (``suite/test_peft_tuners.py``). To run it in
your own tree, subclass it::

    from pytest_safemerge.peft_suite.tuner_contract import PeftTunerSuite

    class TestPeftTuners(PeftTunerSuite):
        pass

A cell is one property on one tuner and one weight dtype
(``test_merge_is_accurate[loha-bfloat16]``). Inside it, the runner (the one the tensor and
layer contracts share) makes one Hypothesis run per layer kind the tuner supports, and one
per flag of the tuner's (each forced on), on randomized configs and random adapter
values (:mod:`~pytest_safemerge.peft_suite.tuner_configs`,
:mod:`~pytest_safemerge.peft_suite.tuner_cases`). The tuners have no independent oracle:
the property is that merging does not change what the layer computes
(:mod:`~pytest_safemerge.peft_suite.tuner_checks`). A tuner, a layer kind, a guarded merge
or an unmerge the installed PEFT lacks is skipped, naming the release and what it lacks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import event, note, reject
from hypothesis import strategies as st

from pytest_safemerge.options import Settings
from pytest_safemerge.peft_suite import tuner_cases, tuner_checks, tuner_configs, tuners
from pytest_safemerge.peft_suite.tuner_cases import InjectionRefused, TunerCase
from pytest_safemerge.results import Row, start_row
from pytest_safemerge.suite import runner

#: The summary's name of each property; failures are prefixed with it.
TUNER_PROPERTY_NAMES = {
    "test_merge_is_accurate": "tuner accuracy",
    "test_unmerge_round_trip": "tuner round trip",
    "test_merge_refuses_non_finite": "tuner refusal",
    "test_refusal_leaves_layer_unchanged": "tuner atomicity",
    "test_merging_twice_is_merging_once": "tuner merge twice",
}
TUNER_DTYPES = ("float32", "float16", "bfloat16")
#: The layer kinds a flag's runs use when the flag is about some kinds (the effective
#: conv parametrization: LoHa and LoKr apply it to Conv1d too).
FLAG_KINDS = {"use_effective_conv2d": ("conv2d", "conv1d")}
ORACLE = "none: the unmerged layer's forward (tuners have no independent oracle)"
_LEAST_PER_RUN = 1


@dataclass(frozen=True)
class TunerCell:
    tuner: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.tuner}-{self.dtype}"


TUNER_CELLS = tuple(
    TunerCell(name, dtype) for name in tuners.tuner_names() for dtype in TUNER_DTYPES
)


@dataclass(frozen=True)
class TunerRun:
    """One Hypothesis run of a cell: a layer kind, with a flag forced on or none."""

    kind: str
    flag: str | None = None

    @property
    def name(self) -> str:
        return self.kind if self.flag is None else f"{self.kind}__{self.flag}"


@functools.cache
def kind_support(name: str, kind: str) -> str | None:
    """None when PEFT injects tuner ``name`` into ``kind`` on its default sizes; else why not."""
    tuner = tuners.installed_tuners()[name]
    options = tuner_configs.default_options(tuner)
    try:
        tuner_cases.build_case(tuner, kind, torch.float32, options, seed=0)
    except InjectionRefused as error:
        return str(error).splitlines()[0]
    return None


def tuner_runs(name: str) -> tuple[list[TunerRun], dict[str, str]]:
    """The runs of ``name``'s cells, and the layer kinds it does not support (with why)."""
    tuner = tuners.installed_tuners()[name]
    refused = {kind: why for kind in tuner_cases.LAYER_KINDS if (why := kind_support(name, kind))}
    kinds = [kind for kind in tuner_cases.LAYER_KINDS if kind not in refused]
    runs = [TunerRun(kind) for kind in kinds]
    for flag in tuner_configs.flags_of(tuner):
        runs.extend(
            TunerRun(kind, flag) for kind in FLAG_KINDS.get(flag, tuple(kinds[:1])) if kind in kinds
        )
    return runs, refused


def cell_skip_reason(cell: TunerCell, selected: tuple[str, ...] | None) -> str | None:
    reason = tuners.missing_reason(cell.tuner) or tuners.merge_refusal(cell.tuner)
    if reason is None and selected is not None and cell.dtype not in selected:
        reason = f"--safemerge-dtypes={','.join(selected)} leaves out {cell.dtype}"
    return reason


@pytest.mark.parametrize("tuner_cell", TUNER_CELLS, ids=[cell.id for cell in TUNER_CELLS])
class PeftTunerSuite:
    """The properties every PEFT tuner's merge must have, one cell per property, tuner and
    weight dtype."""

    @pytest.fixture
    def explore(
        self, request: pytest.FixtureRequest, safemerge_settings: Settings, tuner_cell: TunerCell
    ) -> Callable[[Callable[[TunerCase, Row], None]], None]:
        """Run a property over this cell's generated tuner cases, filling its row."""
        row = start_row(
            request.node,
            contract="peft tuner",
            prop=TUNER_PROPERTY_NAMES[request.node.originalname],
            target=f"peft {tuners.peft_version()}",
            dtype=tuner_cell.dtype,
            kind=tuner_cell.tuner,
        )
        row.data["oracle"] = ORACLE
        reason = cell_skip_reason(tuner_cell, safemerge_settings.dtypes)
        if reason is not None:
            pytest.skip(reason)
        tuner = tuners.installed_tuners()[tuner_cell.tuner]
        runs, refused = tuner_runs(tuner.name)
        row.data["kinds_refused"] = refused
        row.data["options_lacking"] = list(tuner_configs.lacking(tuner))
        row.data["options"] = {}
        if not runs:
            pytest.skip(
                f"PEFT {tuners.peft_version()} injects {tuner.name} into none of the layer "
                f"kinds ({'; '.join(f'{k}: {why}' for k, why in refused.items())})"
            )
        active = sum(
            cell_skip_reason(cell, safemerge_settings.dtypes) is None for cell in TUNER_CELLS
        )
        dtype = getattr(torch, tuner_cell.dtype)

        def run(check: Callable[[TunerCase, Row], None]) -> None:
            def check_one(drawn: tuple[TunerRun, dict[str, Any], int]) -> None:
                one, options, seed = drawn
                try:
                    case = tuner_cases.build_case(tuner, one.kind, dtype, options, seed)
                except InjectionRefused as error:
                    event(f"injection refused: {error}")
                    reject()
                _record(row, case)
                note(case.describe())
                try:
                    check(case, row)
                except tuner_checks.TunerLacks as error:
                    pytest.skip(f"PEFT {tuners.peft_version()}: {error}")

            runner.explore(
                name=f"{request.node.originalname}__{tuner_cell.id}",
                row=row,
                strategies={
                    one.name: st.tuples(
                        st.just(one),
                        tuner_configs.config_options(
                            tuner, frozenset() if one.flag is None else frozenset({one.flag})
                        ),
                        st.integers(0, 2**16),
                    )
                    for one in runs
                },
                known={},
                examples_per_kind=runner.budget(
                    safemerge_settings.examples, active, len(runs), least=_LEAST_PER_RUN
                ),
                check=check_one,
                must_see=sorted({one.kind for one in runs}),
            )
            _assert_flags_met(row, runs)

        return run

    def test_merge_is_accurate(self, explore: Any) -> None:
        """The merged layer computes what the unmerged layer (adapter active) did: its
        weight and bias within one rounding to the dtype plus the float32 computation of
        the delta; a finite merge is not refused."""
        explore(tuner_checks.check_accurate)

    def test_unmerge_round_trip(self, explore: Any) -> None:
        """unmerge() after merge() restores the weight and bias within the bounds of both."""
        explore(tuner_checks.check_round_trip)

    def test_merge_refuses_non_finite(self, explore: Any) -> None:
        """NaN, +Inf or -Inf in any trainable parameter of the adapter (each one in turn)
        makes merge(safe_merge=True) raise ValueError."""
        explore(tuner_checks.check_refused)

    def test_refusal_leaves_layer_unchanged(self, explore: Any) -> None:
        """After a refused merge, the layer's weight, bias and buffers hold their bytes."""
        explore(tuner_checks.check_atomic)

    def test_merging_twice_is_merging_once(self, explore: Any) -> None:
        """A second merge() is a no-op or refused: never the delta applied twice."""
        explore(tuner_checks.check_merge_twice)


def _record(row: Row, case: TunerCase) -> None:
    row.example(case.kind)
    seen = row.data["options"]
    for field, value in case.options.items():
        key = f"{field}={value!r}"
        seen[key] = seen.get(key, 0) + 1
    event(f"layer: {case.kind}")
    event(f"options: {tuner_configs.describe(case.options)}")


def _assert_flags_met(row: Row, runs: list[TunerRun]) -> None:
    """Every flag's run met the flag on (an unexplored option proves nothing)."""
    __tracebackhide__ = True
    missing = [
        one.flag for one in runs if one.flag and not row.data["options"].get(f"{one.flag}=True")
    ]
    if missing:
        raise AssertionError(f"the property never met the options {missing} on")
