"""What the suite found: one row per cell, gathered across pytest-xdist workers.

A cell is one pytest item: a property of the tensor contract on one weight dtype, a
property of the layer contract on one layer kind (and dtype), or a layer of the model
suite. It fills its row while it runs (examples, worst error as a fraction of its bound,
kinds of case met); the row travels in the test report's ``user_properties``, so
pytest-xdist carries it from the workers to the controller, which prints the matrix and
writes the JSON report. Imports only the standard library, pytest and the torch-free
:mod:`safemerge.names`.

A row of the JSON report (``--safemerge-report``)::

    {"contract": "tensor" | "layer" | "model", "property": "accuracy",
     "dtype": "bfloat16" | null, "kind": "nf4" | null, "layer": null | "model.q_proj.weight",
     "result": "passed" | "failed" | "skipped", "status": "passed" | "failed" | "skipped"
     | "unsupported", "examples": 20, "worst_fraction": 0.41 | null,
     "message": "" | "[accuracy] ...", "kinds": {"random": 4, ...}, "target": "MODULE:OBJECT",
     "nodeid": "..."}
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

from safemerge import names

PROPERTY_KEY = "safemerge"
#: A failure message longer than this is cut in the terminal matrix (the JSON keeps it whole).
_SHOWN_MESSAGE = 240

#: Rows of this run, filled on the controller (or the only process) as reports arrive.
ROWS_KEY = pytest.StashKey[list[dict[str, Any]]]()


class Row:
    """The row a running cell fills: ``row.example(kind)`` per case, ``row.observe(f)`` per
    checked result."""

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
        self.data["message"] = text

    def unsupported(self) -> None:
        """The cell fails because the implementation crashed on finite cases."""
        self.data["status"] = "unsupported"


def start_row(
    item: pytest.Item,
    *,
    contract: str,
    prop: str,
    target: str,
    dtype: str | None = None,
    kind: str | None = None,
    layer: str | None = None,
) -> Row:
    data: dict[str, Any] = {
        "contract": contract,
        "property": prop,
        "dtype": dtype,
        "kind": kind,
        "layer": layer,
        "target": target,
        "examples": 0,
        "worst_fraction": None,
        "kinds": {},
        "message": "",
        "status": None,
        "nodeid": item.nodeid,
    }
    item.user_properties.append((PROPERTY_KEY, data))
    return Row(data)


def skipped_row(item: pytest.Item, reason: str, **cell: Any) -> None:
    """The row of a cell that does not run (declared unsupported, or not selected)."""
    row = start_row(item, **cell)
    row.note(reason)


def collect_row(report: pytest.TestReport, rows: list[dict[str, Any]]) -> None:
    """Keep the row of a finished cell (its call, or its setup when that failed or skipped)."""
    data = next((value for key, value in report.user_properties if key == PROPERTY_KEY), None)
    if data is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        row: dict[str, Any] = {**cast(dict[str, Any], data), "result": report.outcome}
        row["status"] = row["status"] if report.failed and row["status"] else report.outcome
        if report.skipped and isinstance(report.longrepr, tuple):
            row["message"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            # The runner notes each failing kind of case; otherwise, the assertion's words.
            row["message"] = row["message"] or _failure_message(report)
        rows.append(row)


def _failure_message(report: pytest.TestReport) -> str:
    """The assertion's own words: the line that names the property (``[accuracy] ...``)."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(getattr(crash, "message", "") or report.longreprtext)
    return text.removeprefix("AssertionError: ").removeprefix(
        "pytest_safemerge.suite.checks.UnsupportedCase: "
    )


def _fraction(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.3f}" if value < 10 else f"{value:.3g}"


_MARKS = {"passed": "ok", "failed": "FAILED", "skipped": "skip", "unsupported": "unsupported"}


def _mark(row: dict[str, Any]) -> str:
    mark = _MARKS[row["status"]]
    if row["status"] == "failed" and row["worst_fraction"] is not None:
        mark += f" {_fraction(row['worst_fraction'])}"
    return mark


def summary_lines(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The terminal summary: a matrix per contract (properties x cells), the model suite's
    layers as a list, then each failure's message."""
    rows = list(rows)
    lines: list[str] = []
    by_contract: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_contract.setdefault(row["contract"], []).append(row)
    # The tensor and layer contracts first, then any other matrix (the PEFT contracts'),
    # and the model suite's layers as a list.
    matrices: list[str] = [c for c in ("tensor", "layer") if c in by_contract]
    matrices += [c for c in by_contract if c not in ("tensor", "layer", "model")]
    for contract in matrices:
        lines.extend(_matrix(contract, by_contract[contract]))
    if "model" in by_contract:
        lines.extend(_layer_list(by_contract["model"]))
    failures = [row for row in rows if row["result"] == "failed"]
    if failures:
        lines.append("failed cells:")
        for row in sorted(failures, key=_cell_key):
            message = row["message"].splitlines()[0] if row["message"] else ""
            if len(message) > _SHOWN_MESSAGE:
                message = message[: _SHOWN_MESSAGE - 3] + "..."
            lines.append(f"  {_cell_name(row)}: {message}")
    return lines


def _cell_name(row: dict[str, Any]) -> str:
    where = "/".join(part for part in (row["kind"], row["dtype"], row["layer"]) if part)
    return f"{row['contract']} {row['property']}" + (f" [{where}]" if where else "")


def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Contract, property, then layer kinds and dtypes in the order names lists them."""
    return (
        row["contract"],
        row["property"],
        _position(names.LAYER_KINDS, row["kind"]),
        _position(names.WEIGHT_DTYPES, row["dtype"]),
        str(row["layer"] or ""),
    )


def _position(order: tuple[str, ...], value: str | None) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), str(value or ""))


def _column(row: dict[str, Any]) -> str:
    return "/".join(part for part in (row["kind"], row["dtype"]) if part) or "-"


def _matrix(contract: str, members: list[dict[str, Any]]) -> list[str]:
    """Properties down, cells (dtype, or layer kind/dtype) across: one mark each."""
    columns = list(dict.fromkeys(_column(row) for row in sorted(members, key=_cell_key)))
    properties = sorted({row["property"] for row in members})
    shown = {prop: prop.removeprefix("layer ") for prop in properties}
    marks = {(row["property"], _column(row)): _mark(row) for row in members}
    examples = sum(row["examples"] for row in members)
    lines = [f"{contract} contract ({members[0]['target']}; {examples} examples):"]
    # A wide layer matrix is printed transposed: cells down, properties across.
    transposed = len(columns) > 6
    across, down = (properties, columns) if transposed else (columns, properties)
    head = max(len(shown.get(name, name)) for name in down)
    widths = [
        max(
            len(shown.get(name, name)),
            *(len(marks.get(_key(transposed, d, name), "")) for d in down),
        )
        for name in across
    ]
    lines.append(
        "  "
        + " " * head
        + "  "
        + "  ".join(f"{shown.get(n, n):<{w}}" for n, w in zip(across, widths, strict=True))
    )
    for name in down:
        cells = [marks.get(_key(transposed, name, other), "") for other in across]
        lines.append(
            f"  {shown.get(name, name):<{head}}  "
            + "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()
        )
    return lines


def _key(transposed: bool, down: str, across: str) -> tuple[str, str]:
    return (across, down) if transposed else (down, across)


def _layer_list(members: list[dict[str, Any]]) -> list[str]:
    """The model suite: one line per layer checked."""
    lines: list[str] = []
    by_property: dict[str, list[dict[str, Any]]] = {}
    for row in members:
        by_property.setdefault(row["property"], []).append(row)
    for prop, group in by_property.items():
        group.sort(key=lambda r: str(r["layer"]))
        width = max(len(str(r["layer"])) for r in group)
        lines.append(f"{prop} ({group[0]['target']}):")
        lines.append(f"  {'':{width}}  examples  worst/bound  result")
        for row in group:
            lines.append(
                f"  {row['layer']!s:{width}}  {row['examples']:>8}  "
                f"{_fraction(row['worst_fraction']):>11}  {row['status']}"
            )
    return lines


def write_report(path: str, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """Write the JSON report atomically: a temporary file in the same directory, renamed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    results = [row["result"] for row in rows]
    document = {
        **header,
        "summary": {result: results.count(result) for result in ("passed", "failed", "skipped")},
        "results": [_finite_json(row) for row in sorted(rows, key=_cell_key)],
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
