"""One property over one cell: the runner both contracts share.

A cell (a property on one weight dtype, or on one layer kind and dtype) gets one
Hypothesis run per kind of case, each with its share of the cell's examples and the
hand-written cases of that kind first: a single run over all kinds would spend its budget
unevenly (Hypothesis mutates the examples it has, so it stays with the kinds it met first).
Each run is named after the cell and the kind: Hypothesis keys its example database and
its derandomized seed on the name, and prints it with a failure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis.strategies import SearchStrategy

from pytest_safemerge.results import Row
from pytest_safemerge.suite.checks import UnsupportedCase

if sys.version_info < (3, 11):  # Hypothesis installs the backport there
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

CaseT = TypeVar("CaseT")
_PHASES = tuple(phase for phase in Phase if phase is not Phase.explain)
_PHASES_WITHOUT_SHRINK = tuple(phase for phase in _PHASES if phase is not Phase.shrink)


def budget(examples: int, cells: int, kinds: int, *, least: int) -> int:
    """Examples per kind of case in one cell: ``examples`` (one property's) shared among
    its ``cells`` and each cell's ``kinds``, ``least`` at the fewest."""
    return max(examples // max(cells, 1) // max(kinds, 1), least)


def explore(
    *,
    name: str,
    row: Row,
    strategies: Mapping[str, SearchStrategy[CaseT]],
    known: Mapping[str, Sequence[CaseT]],
    examples_per_kind: int,
    check: Callable[[CaseT], None],
    must_see: Sequence[str] = (),
    shrink: bool = True,
) -> None:
    """Check ``check`` over every kind's strategy; fail if a kind in ``must_see`` was never met.

    ``shrink=False`` reports a failing case as first found: for cases that cost a model
    build each, where shrinking would rebuild one per attempt.
    """
    __tracebackhide__ = True
    failures: list[tuple[str, Exception]] = []
    for kind, strategy in strategies.items():

        @settings(
            settings.default,
            max_examples=examples_per_kind,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            # No "explain" phase: the message already says what broke and where, and
            # explaining a tensor case re-runs it many times over.
            phases=_PHASES if shrink else _PHASES_WITHOUT_SHRINK,
        )
        @given(strategy)
        def property_holds(case: CaseT) -> None:
            check(case)

        cast(Any, property_holds).hypothesis.inner_test.__name__ = _identifier(f"{name}__{kind}")
        for known_case in known.get(kind, ()):
            property_holds = example(known_case)(property_holds)
        # Every kind runs, failing or not: one failing kind of case never hides another's.
        try:
            property_holds()
        except Exception as error:
            failures.append((kind, error))
    if failures:
        row.note("; ".join(f"{kind}: {_first_line(error)}" for kind, error in failures))
        if all(isinstance(error, UnsupportedCase) for _, error in failures):
            row.unsupported()
        if len(failures) == 1:
            raise failures[0][1]
        raise ExceptionGroup(
            f"{len(failures)} kinds of case failed: {', '.join(kind for kind, _ in failures)}",
            [error for _, error in failures],
        )
    assert_explored(row, must_see)


def _first_line(error: BaseException) -> str:
    """What a failure says, in one line (each distinct failure of a group, joined)."""
    if isinstance(error, BaseExceptionGroup):
        return " | ".join(_first_line(inner) for inner in error.exceptions)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _identifier(name: str) -> str:
    """``name`` as a Python identifier (Hypothesis names its runs with it)."""
    name = name.replace("+inf", "posinf").replace("-inf", "neginf")
    return "".join(c if c.isalnum() else "_" for c in name)


def assert_explored(row: Row, kinds: Sequence[str]) -> None:
    """The property met every kind it is about (an unexplored property proves nothing)."""
    __tracebackhide__ = True
    seen = row.data["kinds"]
    missing = [kind for kind in kinds if not seen.get(kind)]
    if missing:
        raise AssertionError(
            f"the property never met the case kinds {missing} (met: {seen}): the strategy "
            f"generated no valid example of them"
        )
