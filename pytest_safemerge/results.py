"""What the suite found: one row per property or layer, gathered across pytest-xdist workers.

A test of the suite fills its row while it runs (examples, worst error as a fraction of
its bound, adversarial kinds generated); the row travels in the test report's
``user_properties``, so pytest-xdist carries it from the workers to the controller, which
prints the summary table and writes the JSON report. Imports only the standard library
and pytest.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest

PROPERTY_KEY = "safemerge"

#: Rows of this run, filled on the controller (or the only process) as reports arrive.
ROWS_KEY = pytest.StashKey[list[dict[str, Any]]]()


class Row:
    """The row a running test fills: ``row.observe(fraction)`` per checked result."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def example(self, kind: str | None = None) -> None:
        self.data["examples"] += 1
        if kind is not None:
            kinds = self.data["kinds"]
            kinds[kind] = kinds.get(kind, 0) + 1

    def observe(self, fraction: float) -> None:
        """Record one result's worst error as a fraction of its bound."""
        worst = self.data["worst_fraction"]
        if worst is None or not fraction <= worst:
            self.data["worst_fraction"] = fraction

    def note(self, text: str) -> None:
        self.data["detail"] = text


def start_row(item: pytest.Item, group: str, name: str, target: str) -> Row:
    data: dict[str, Any] = {
        "group": group,
        "name": name,
        "target": target,
        "examples": 0,
        "worst_fraction": None,
        "kinds": {},
        "detail": "",
        "nodeid": item.nodeid,
    }
    item.user_properties.append((PROPERTY_KEY, data))
    return Row(data)


def collect_row(report: pytest.TestReport, rows: list[dict[str, Any]]) -> None:
    """Keep the row of a finished test (its call, or its setup when that failed or skipped)."""
    data = next((value for key, value in report.user_properties if key == PROPERTY_KEY), None)
    if data is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        row: dict[str, Any] = {**cast(dict[str, Any], data), "outcome": report.outcome}
        if report.skipped and isinstance(report.longrepr, tuple):
            row["detail"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        rows.append(row)


def _fraction(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.3f}" if value < 10 else f"{value:.3g}"


def summary_lines(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The terminal table: one line per row, grouped (contract properties, layers, ...)."""
    lines: list[str] = []
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    for group, members in by_group.items():
        members.sort(key=lambda r: r["name"])
        width = max(len(r["name"]) for r in members)
        lines.append(f"{group} ({members[0]['target']}):")
        lines.append(f"  {'':{width}}  examples  worst/bound  result")
        for row in members:
            lines.append(
                f"  {row['name']:{width}}  {row['examples']:>8}  "
                f"{_fraction(row['worst_fraction']):>11}  {row['outcome']}"
                + (f"  ({row['detail']})" if row["detail"] and row["outcome"] != "passed" else "")
            )
    return lines


def write_report(path: str, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Write the JSON report atomically: a temporary file in the same directory, renamed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    outcomes = [row["outcome"] for row in rows]
    document = {
        **header,
        "summary": {o: outcomes.count(o) for o in ("passed", "failed", "skipped")},
        "results": [
            _finite_json(row) for row in sorted(rows, key=lambda r: (r["group"], r["name"]))
        ],
    }
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(document, stream, indent=2, allow_nan=False, default=str)
            stream.write("\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _finite_json(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no Infinity or NaN: a fraction that large is written as a string.
    fraction = row["worst_fraction"]
    if isinstance(fraction, float) and not math.isfinite(fraction):
        return dict(row, worst_fraction=str(fraction))
    return row
