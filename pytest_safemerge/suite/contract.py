"""The conformance suite for the tensor-level contract, as a class to subclass.

``pytest --safemerge-impl=MODULE:OBJECT`` (or ``--safemerge-suite``) runs it against that
implementation (safemerge's engine by default). To run it inside your own test tree,
subclass it and override the ``safemerge_impl`` fixture::

    from pytest_safemerge.suite import ConformanceSuite

    class TestMyMerge(ConformanceSuite):
        @pytest.fixture(scope="session")
        def safemerge_impl(self):
            return MyMerger()

Each test is one property, checked over Hypothesis-generated ordinary and adversarial
cases; a failure shows the shrunk case and says which property broke and how badly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import event, note

from pytest_safemerge.implementations import Implementation, load_implementation
from pytest_safemerge.options import Settings
from pytest_safemerge.results import start_row
from pytest_safemerge.strategies import MergeCase, kinds_for_dtype, merge_cases
from pytest_safemerge.suite import checks, runner
from pytest_safemerge.suite.checks import Checked
from pytest_safemerge.suite.known_cases import known_cases, known_large_cases
from safemerge import names

#: Cases whose merge is finite and must be accurate (ordinary, and adversarial kinds a
#: careless merge gets wrong without producing a non-finite value).
ACCURATE_KINDS = (
    "random",
    "fp16-product-overflow",
    "subnormal",
    "cancellation",
    "non-contiguous",
    "delta-overflow",
)
#: Cases every correct implementation refuses, whatever the weight and the scale.
REFUSED_KINDS = ("nan", "+inf", "-inf", "cast-overflow")
EVERY_KIND = (*ACCURATE_KINDS, *REFUSED_KINDS)
ROUND_TRIP_KINDS = ("random", "subnormal", "cancellation", "non-contiguous")
#: The summary's name of each property; failures are prefixed with it, e.g. "[accuracy]".
PROPERTY_NAMES = {
    "test_fuse_is_accurate": "accuracy",
    "test_fuse_keeps_form": "form",
    "test_fuse_leaves_adapters_unmodified": "adapters unmodified",
    "test_fuse_refuses_non_finite": "refusal",
    "test_refusal_leaves_weight_unchanged": "atomicity",
    "test_unfuse_round_trip": "round trip",
    "test_stacked_fuses_unfuse_in_reverse": "stacked round trip",
    "test_fuse_refuses_non_finite_in_large_weights": "refusal in large weights",
    "test_in_place_agrees_with_returned": "in-place agreement",
}
#: The fewest examples each kind of case gets in one cell, whatever --safemerge-examples says.
_LEAST_PER_KIND = 3


@pytest.mark.parametrize("weight_dtype", names.WEIGHT_DTYPES)
class ConformanceSuite:
    """The properties every merge implementation must have (docs/design.md, "Tensor
    contract"), one cell per property and weight dtype (``test_fuse_is_accurate[bfloat16]``)."""

    @pytest.fixture
    def implementation(self, safemerge_impl: Any, safemerge_settings: Settings) -> Implementation:
        return as_implementation(safemerge_impl, safemerge_settings)

    @pytest.fixture
    def explore(
        self,
        request: pytest.FixtureRequest,
        implementation: Implementation,
        safemerge_settings: Settings,
        weight_dtype: str,
    ) -> Callable[..., None]:
        """Run a property over this cell's generated and hand-written cases, filling its row
        of the summary; skip a cell the implementation does not declare or the run does not
        select."""
        prop = PROPERTY_NAMES[request.node.originalname]
        row = start_row(
            request.node,
            contract="tensor",
            prop=prop,
            target=implementation.spec,
            dtype=weight_dtype,
        )
        selected = safemerge_settings.dtypes
        reason = implementation.dtype_skip_reason(weight_dtype, selected)
        if reason is not None:
            pytest.skip(reason)
        cells = sum(
            implementation.dtype_skip_reason(name, selected) is None for name in names.WEIGHT_DTYPES
        )
        dtype: torch.dtype = getattr(torch, weight_dtype)
        device = safemerge_settings.device

        def run(
            check: Callable[[Implementation, Checked, Any], None],
            kinds: Sequence[str],
            *,
            must_see: Sequence[str] = (),
            min_side: int = 1,
            max_side: int = 16,
            budget: int | None = None,
            least: int = _LEAST_PER_KIND,
            known: Callable[[str, torch.dtype], list[MergeCase]] = known_cases,
        ) -> None:
            applicable = kinds_for_dtype(dtype)
            kinds = tuple(kind for kind in kinds if kind in applicable)
            if not kinds:
                pytest.skip(f"no case of this property applies to {weight_dtype} weights")

            def check_one(case: MergeCase) -> None:
                row.example(case.kind)
                event(f"adapter dtype: {case.adapter.lora_A.dtype}")
                checked = Checked(case, device)
                note(f"case kind {case.kind!r}: {case.detail or 'ordinary'}")
                note(
                    f"weight {tuple(checked.weight.shape)} {checked.weight.dtype}, adapter "
                    f"{checked.lora_A.dtype}, scale passed {checked.coefficient!r}"
                )
                check(implementation, checked, row)

            runner.explore(
                name=f"{request.node.originalname}__{weight_dtype}",
                row=row,
                strategies={
                    kind: merge_cases(
                        dtype=dtype, kinds=(kind,), min_side=min_side, max_side=max_side
                    )
                    for kind in kinds
                },
                known={kind: known(kind, dtype) for kind in kinds},
                examples_per_kind=runner.budget(
                    safemerge_settings.examples if budget is None else budget,
                    cells,
                    len(kinds),
                    least=least,
                ),
                check=check_one,
                must_see=[kind for kind in must_see if kind in kinds],
            )

        return run

    def test_fuse_is_accurate(self, implementation: Implementation, explore: Any) -> None:
        """Within the forward error bound of a float32 merge and one rounding to the dtype
        (a merge computed in float16 or bfloat16 fails it); a finite merge is not refused."""

        explore(checks.check_accurate, ACCURATE_KINDS, must_see=ACCURATE_KINDS)

    def test_fuse_keeps_form(self, implementation: Implementation, explore: Any) -> None:
        """The merged weight keeps its dtype, shape and device; fuse returns a Tensor or None."""

        explore(checks.check_form, ACCURATE_KINDS)

    def test_fuse_leaves_adapters_unmodified(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """lora_A and lora_B hold the same bits after the call, refused or not."""

        explore(checks.check_adapters_unmodified, EVERY_KIND)

    def test_fuse_refuses_non_finite(self, implementation: Implementation, explore: Any) -> None:
        """NaN, +Inf or -Inf anywhere in the adapter (at any scale, zero and tiny included),
        and float32-finite sums beyond the dtype's range, are refused by raising."""

        explore(checks.check_refused, REFUSED_KINDS, must_see=REFUSED_KINDS)

    def test_refusal_leaves_weight_unchanged(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """After a refusal the weight holds every bit it held before (no write before check)."""

        explore(checks.check_atomic, REFUSED_KINDS, must_see=REFUSED_KINDS)

    def test_fuse_refuses_non_finite_in_large_weights(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """As :meth:`test_fuse_refuses_non_finite`, with weights of 4,096 to 1.2 million
        elements: a guard that checks in blocks and misses the last, partial one fails."""
        explore(
            checks.check_refused_atomically,
            REFUSED_KINDS,
            must_see=REFUSED_KINDS,
            min_side=64,
            max_side=1100,
            budget=0,  # one case of each kind per cell: each is up to 1.2 million elements
            least=1,
            known=known_large_cases,
        )

    def test_unfuse_round_trip(self, implementation: Implementation, explore: Any) -> None:
        """unfuse(fuse(W)) is W within the two merges' bounds, or to the bit when the
        implementation claims ``exact_unfuse``."""
        if not implementation.has_unfuse:
            pytest.skip(f"{implementation.spec} has no unfuse")

        explore(checks.check_round_trip, ROUND_TRIP_KINDS)

    def test_stacked_fuses_unfuse_in_reverse(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """Two adapters fused one after the other: unfusing the second gives back the
        weight after the first (to the bit when ``exact_unfuse`` is claimed), and with an
        exact unfuse, unfusing the first then gives back the original."""
        if not implementation.has_unfuse:
            pytest.skip(f"{implementation.spec} has no unfuse")
        explore(checks.check_stacked_round_trip, ROUND_TRIP_KINDS)

    def test_in_place_agrees_with_returned(
        self, implementation: Implementation, explore: Any
    ) -> None:
        """A fuse that both returns a tensor and writes the weight leaves the same bits in both."""

        explore(checks.check_in_place_agreement, ACCURATE_KINDS)


def as_implementation(target: Any, settings: Settings) -> Implementation:
    """``target`` under its ``--safemerge-impl`` name, or its class's for an override."""
    if isinstance(target, Implementation):
        return target
    named = load_implementation(settings.impl)
    if target is named.target:
        return named
    kind = target if isinstance(target, type) else type(target)
    return Implementation(f"{kind.__module__}.{kind.__qualname__}", target)
