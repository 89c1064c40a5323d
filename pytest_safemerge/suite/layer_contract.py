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
from hypothesis import HealthCheck, event, example, given, note, settings

from pytest_safemerge.implementations import Implementation
from pytest_safemerge.layer_strategies import (
    LAYER_TAGS,
    REFUSED_LAYER_KINDS,
    LayerCase,
    kinds_for,
    layer_cases,
    options_for,
)
from pytest_safemerge.options import Settings
from pytest_safemerge.results import Row, start_row
from pytest_safemerge.suite import layer_checks
from pytest_safemerge.suite.contract import as_implementation
from pytest_safemerge.suite.known_layer_cases import known_layer_cases
from pytest_safemerge.suite.layer_checks import LayerChecked

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
#: The fewest examples each cell (kind of case x layer kind x option) gets.
_LEAST_PER_CELL = 3


@dataclass(frozen=True)
class Cell:
    """One Hypothesis run: a kind of case on a layer kind, with options required (random
    cases get a run per option, so that every option is met; adversarial ones draw theirs)."""

    kind: str
    layer: str
    options: frozenset[str]

    @property
    def name(self) -> str:
        kind = {"+inf": "posinf", "-inf": "neginf"}.get(self.kind, self.kind)
        parts = [kind, self.layer, *sorted(self.options)]
        return "__".join("".join(c if c.isalnum() else "_" for c in part) for part in parts)


def cells(kinds: Sequence[str], allowed: Collection[str]) -> list[Cell]:
    """Every cell of ``kinds`` the implementation's tags allow."""
    found: list[Cell] = []
    for kind in kinds:
        for layer in LAYER_TAGS:
            if layer not in allowed or kind not in kinds_for(layer, allowed):
                continue
            focuses: list[frozenset[str]] = [frozenset()]
            if kind == "random":
                focuses += [frozenset({o}) for o in sorted(options_for(layer) & set(allowed))]
            found.extend(Cell(kind, layer, focus) for focus in focuses)
    return found


class LayerConformanceSuite:
    """The properties every module-level merge implementation must have."""

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
    ) -> Callable[..., None]:
        """Run a property over generated layer cases, filling this test's row."""
        prop = LAYER_PROPERTY_NAMES[request.node.originalname]
        row = start_row(request.node, "layer contract", prop, implementation.spec)
        row.data["tags"] = {}
        allowed = implementation.layer_kinds
        device = safemerge_settings.device

        def run(
            check: Callable[[Implementation, LayerChecked, Row], None], kinds: Sequence[str]
        ) -> None:
            explored = cells(kinds, allowed)
            share = max(safemerge_settings.examples // max(len(explored), 1), _LEAST_PER_CELL)
            for cell in explored:

                @settings(
                    settings.default,
                    max_examples=share,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                )
                @given(
                    layer_cases(
                        layer=cell.layer, kind=cell.kind, options=cell.options, allowed=allowed
                    )
                )
                def property_holds(case: LayerCase) -> None:
                    _record(row, case)
                    note(f"case kind {case.kind!r}: {case.detail or 'ordinary'}")
                    note(case.describe())
                    check(implementation, LayerChecked(case, device), row)

                # Named after the test and the cell: Hypothesis keys its example database
                # and its derandomized seed on the name, and prints it with a failure.
                name = f"{request.node.originalname}__{cell.name}"
                property_holds.hypothesis.inner_test.__name__ = name  # type: ignore[attr-defined]
                for known in known_layer_cases(cell.kind, cell.layer, cell.options, allowed):
                    property_holds = example(known)(property_holds)
                property_holds()
            _assert_explored(row, explored, kinds)

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


def _assert_explored(row: Row, explored: Sequence[Cell], kinds: Sequence[str]) -> None:
    """The property met every kind of case and every tag its cells are about (an
    unexplored property proves nothing)."""
    __tracebackhide__ = True
    seen_kinds, seen_tags = row.data["kinds"], row.data["tags"]
    wanted_kinds = sorted({cell.kind for cell in explored})
    wanted_tags = sorted(
        {cell.layer for cell in explored} | {o for c in explored for o in c.options}
    )
    missing = [kind for kind in wanted_kinds if not seen_kinds.get(kind)]
    missing += [tag for tag in wanted_tags if not seen_tags.get(tag)]
    if not explored or missing:
        raise AssertionError(
            f"the property never met {missing or list(kinds)} (met kinds {seen_kinds}, tags "
            f"{seen_tags}): the strategy generated no valid example of them"
            + ("" if explored else ", or layer_kinds allows none of them")
        )
