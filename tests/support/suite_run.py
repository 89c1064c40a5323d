"""One pytest run of chosen cells of a suite module, in a subprocess from an empty
directory, as a user runs the suite: the findings tests' way of putting a library under
the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def run_cells(
    directory: Path,
    module: str,
    source: str,
    cells: Iterable[str],
    *,
    flags: Sequence[str] = (),
    timeout: float = 900,
    env: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``source`` as ``directory/module``, run its ``cells`` (``Class::test[id]``)
    derandomized (Hypothesis' ``ci`` profile) with ``flags``, and return the report's
    rows by cell.

    Raises:
        AssertionError: the run wrote no report (its output is the message).
    """
    (directory / module).write_text(source)
    command = [
        *(sys.executable, "-m", "pytest"),
        *(f"{module}::{cell}" for cell in sorted(set(cells))),
        *("-p", "no:cacheprovider", "-n", "0", "--hypothesis-profile=ci"),
        "--safemerge-report=report.json",
        *flags,
    ]
    done = subprocess.run(
        command,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    report = directory / "report.json"
    assert report.is_file(), done.stdout + done.stderr
    rows = json.loads(report.read_text())["results"]
    return {row["nodeid"].split("::", 1)[1]: row for row in rows}
