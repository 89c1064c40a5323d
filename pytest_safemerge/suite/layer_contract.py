"""The conformance suite for the module-level contract, as a class to subclass.

``pytest --safemerge-impl=MODULE:OBJECT`` (or ``--safemerge-suite``) collects it next to
the tensor suite when the implementation has ``fuse_layer``. To run it inside your own
test tree, subclass it and override the ``safemerge_impl`` fixture::

    from pytest_safemerge.suite import LayerConformanceSuite

    class TestMyLayerMerge(LayerConformanceSuite):
        @pytest.fixture(scope="session")
        def safemerge_impl(self):
            return MyMerger()

Each test is one property, checked over Hypothesis-generated layers of every kind the
implementation supports (``layer_kinds``), ordinary and adversarial.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import event, note

from pytest_safemerge.implementations import Implementation
from pytest_safemerge.layer_strategies import (
    REFUSED_LAYER_KINDS,
    LayerCase,
    kinds_for,
    layer_cases,
    options_for,
)
from pytest_safemerge.options import Settings
from pytest_safemerge.results import Row, start_row
from pytest_safemerge.suite import layer_checks, runner
from pytest_safemerge.suite.contract import as_implementation
from pytest_safemerge.suite.known_layer_cases import known_layer_cases
from pytest_safemerge.suite.layer_checks import LayerChecked
from safemerge import names

#: The summary's name of each property; failures are prefixed with it.
LAYER_PROPERTY_NAMES = {
    "test_fuse_layer_is_accurate": "layer accuracy",
    "test_fuse_layer_keeps_form": "layer form",
    "test_fuse_layer_leaves_adapters_unmodified": "layer adapters unmodified",
    "test_fuse_layer_refuses_non_finite": "layer refusal",
    "test_layer_refusal_leaves_layer_unchanged": "layer atomicity",
    "test_unfuse_layer_round_trip": "layer round trip",
}
ACCURATE_KINDS = ("random",)
EVERY_KIND = ("random", *REFUSED_LAYER_KINDS)
#: Weight dtypes of the unquantized layer kinds (a quantized layer's weight is its codes).
LAYER_DTYPES = ("float32", "float16", "bfloat16")
#: The fewest examples each run of a cell (a kind of case, with an option) gets.
_LEAST_PER_RUN = 1


@dataclass(frozen=True)
class LayerCell:
    """One pytest item of the layer contract: a layer kind, and its weight dtype (None for
    a quantized kind, named by its quantization type)."""

    layer: str
    dtype: str | None

    @property
    def id(self) -> str:
        return self.layer if self.dtype is None else f"{self.layer}-{self.dtype}"


LAYER_CELLS: tuple[LayerCell, ...] = (
    *(LayerCell(layer, dtype) for layer in names.UNQUANTIZED_KINDS for dtype in LAYER_DTYPES),
    *(LayerCell(quant, None) for quant in names.QUANT_TYPES),
)


@dataclass(frozen=True)
class Run:
    """One Hypothesis run inside a cell: a kind of case on the cell's layer, with options
    required (random cases get a run per option, so that every option is met;
    adversarial ones draw theirs)."""

    kind: str
    layer: str
    options: frozenset[str]

    @property
    def name(self) -> str:
        return "__".join([self.kind, *sorted(self.options)])


def runs(kinds: Sequence[str], layer: str, allowed: Collection[str]) -> list[Run]:
    """Every run of ``kinds`` on ``layer`` that the implementation's tags allow."""
    found: list[Run] = []
    for kind in kinds:
        if kind not in kinds_for(layer, allowed):
            continue
        focuses: list[frozenset[str]] = [frozenset()]
        if kind == "random":
            focuses += [frozenset({o}) for o in sorted(options_for(layer) & set(allowed))]
        found.extend(Run(kind, layer, focus) for focus in focuses)
    return found


def cell_skip_reason(
    cell: LayerCell, implementation: Implementation, selected: Sequence[str] | None
) -> str | None:
    """Why ``cell`` does not run, or None when it does."""
    reason = implementation.layer_skip_reason(cell.layer)
    if reason is not None or cell.dtype is None:
        return reason
    return implementation.dtype_skip_reason(cell.dtype, selected)


@pytest.mark.parametrize("layer_cell", LAYER_CELLS, ids=[cell.id for cell in LAYER_CELLS])
class LayerConformanceSuite:
    """The properties every module-level merge implementation must have, one cell per
    property, layer kind and dtype (``test_fuse_layer_is_accurate[linear-bfloat16]``,
    ``[nf4]``)."""

    @pytest.fixture
    def implementation(self, safemerge_impl: Any, safemerge_settings: Settings) -> Implementation:
        implementation = as_implementation(safemerge_impl, safemerge_settings)
        if not implementation.has_fuse_layer:
            pytest.skip(f"{implementation.spec} has no fuse_layer")
        implementation.check_layer_kinds()
        return implementation

    @pytest.fixture
    def explore(
        self,
        request: pytest.FixtureRequest,
        implementation: Implementation,
        safemerge_settings: Settings,
        layer_cell: LayerCell,
    ) -> Callable[..., None]:
        """Run a property over this cell's generated layer cases, filling its row."""
        prop = LAYER_PROPERTY_NAMES[request.node.originalname]
        row = start_row(
            request.node,
            contract="layer",
            prop=prop,
            target=implementation.spec,
            dtype=layer_cell.dtype,
            kind=layer_cell.layer,
        )
        row.data["tags"] = {}
        selected = safemerge_settings.dtypes
        reason = cell_skip_reason(layer_cell, implementation, selected)
        if reason is not None:
            pytest.skip(reason)
        active = sum(cell_skip_reason(c, implementation, selected) is None for c in LAYER_CELLS)
        allowed = implementation.tags_for(layer_cell.layer)
        device = safemerge_settings.device
        dtype = None if layer_cell.dtype is None else getattr(torch, layer_cell.dtype)

        def run(
            check: Callable[[Implementation, LayerChecked, Row], None], kinds: Sequence[str]
        ) -> None:
            planned = runs(kinds, layer_cell.layer, allowed)

            def check_one(case: LayerCase) -> None:
                _record(row, case)
                note(f"case kind {case.kind!r}: {case.detail or 'ordinary'}")
                note(case.describe())
                check(implementation, LayerChecked(case, device), row)

            runner.explore(
                name=f"{request.node.originalname}__{layer_cell.id}",
                row=row,
                strategies={
                    one.name: layer_cases(
                        layer=one.layer,
                        kind=one.kind,
                        options=one.options,
                        allowed=allowed,
                        dtype=dtype,
                    )
                    for one in planned
                },
                known={
                    one.name: [
                        case
                        for case in known_layer_cases(one.kind, one.layer, one.options, allowed)
                        if dtype is None or case.layer.weight.dtype == dtype
                    ]
                    for one in planned
                },
                examples_per_kind=runner.budget(
                    safemerge_settings.examples, active, len(planned), least=_LEAST_PER_RUN
                ),
                check=check_one,
            )
            _assert_explored(row, planned, kinds)

        return run

    def test_fuse_layer_is_accurate(self, implementation: Implementation, explore: Any) -> None:
        """The weight (dequantized for a quantized layer) and the bias are within the bounds
        of float32 merges and their roundings (one per adapter when merged one at a time);
        a bias no lora_bias touches keeps its bits; a finite merge is not refused."""
        explore(layer_checks.check_layer_accurate, ACCURATE_KINDS)

    def test_fuse_layer_keeps_form(self, implementation: Implementation, explore: Any) -> None:
        """Every tensor keeps its class, dtype, shape and device; quantization settings are
        kept; fuse_layer returns None."""
        explore(layer_checks.check_layer_form, ACCURATE_KINDS)

    def test_fuse_layer_leaves_adapters_unmodified(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """lora_A, lora_B, lora_bias and magnitude hold the same bits after the call."""
        explore(layer_checks.check_layer_adapters_unmodified, EVERY_KIND)

    def test_fuse_layer_refuses_non_finite(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """NaN, +Inf or -Inf anywhere in an adapter (any scale, 0 included), and weights or
        biases whose float32 sum is beyond their dtype's range, are refused by raising."""
        explore(layer_checks.check_layer_refused, REFUSED_LAYER_KINDS)

    def test_layer_refusal_leaves_layer_unchanged(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """After a refusal every tensor of the layer, quantization state included, holds
        the bytes it held (no write before the last check)."""
        explore(layer_checks.check_layer_atomic, REFUSED_LAYER_KINDS)

    def test_unfuse_layer_round_trip(self, implementation: Implementation, explore: Any) -> None:
        """unfuse_layer(fuse_layer(layer)) restores every byte when ``exact_unfuse`` is
        claimed, otherwise the original values within the bounds of both merges."""
        if not implementation.has_unfuse_layer:
            pytest.skip(f"{implementation.spec} has no unfuse_layer")
        explore(layer_checks.check_layer_round_trip, ACCURATE_KINDS)


def _record(row: Row, case: LayerCase) -> None:
    row.example(case.kind)
    tags = row.data["tags"]
    for tag in case.tags:
        tags[tag] = tags.get(tag, 0) + 1
    event(f"layer: {case.layer_tag}")
    event(f"options: {', '.join(case.options) or 'none'}")
    if not case.quantized:
        event(f"dtype: {case.layer.weight.dtype}")


def _assert_explored(row: Row, planned: Sequence[Run], kinds: Sequence[str]) -> None:
    """The cell met every kind of case and every option its runs are about (an
    unexplored property proves nothing)."""
    __tracebackhide__ = True
    if not planned:
        pytest.skip(f"no case of {list(kinds)} applies to this layer kind with its tags")
    runner.assert_explored(row, sorted({one.kind for one in planned}))
    seen = row.data["tags"]
    missing = sorted({o for one in planned for o in one.options} - set(seen))
    if missing:
        raise AssertionError(
            f"the property never met the options {missing} (met {seen}): the strategy "
            f"generated no valid example of them"
        )
