"""One pytest run of the PEFT contracts against an older PEFT release, installed beside
the current one.

``.ci/setup`` installs PEFT :data:`RELEASE` into :data:`RELEASE_DIR` (``pip install
--no-deps --target``). :func:`run_release` runs pytest in a subprocess from an empty
directory with that folder first on ``PYTHONPATH``, as a PEFT maintainer would, and hands
back the PEFT the run imported and the rows of its ``--safemerge-report``. The tests of
``tests/pytest_safemerge/test_peft_releases*.py`` share it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "CONFTEST",
    "RELEASE",
    "RELEASE_DIR",
    "Finding",
    "ReleaseRun",
    "assert_exactly_the_findings_fail",
    "release_dir",
    "run_release",
]

#: The oldest PEFT the contracts support.
RELEASE = "0.10.0"
RELEASE_DIR = Path(__file__).parents[2] / ".venv" / "peft-releases" / RELEASE
#: The run's conftest: writes the version and path of the PEFT it imported (``peft.json``).
CONFTEST = """
import json

import peft


def pytest_configure(config):
    with open("peft.json", "w") as stream:
        json.dump({"version": peft.__version__, "path": peft.__file__}, stream)
"""


@dataclass(frozen=True)
class ReleaseRun:
    """What one run against the release left.

    Attributes:
        peft: the ``version`` and ``path`` of the PEFT the run imported.
        rows: the report's rows, by cell (``test[id]``).
        directory: the directory the run ran in (for what its conftest wrote).
        output: the tail of the run's stdout and stderr.
    """

    peft: dict[str, str]
    rows: dict[str, dict[str, Any]]
    directory: Path
    output: str


def release_dir() -> Path:
    """:data:`RELEASE_DIR`; skips the test when the release is not installed there, or
    fails it under ``CI=true``: CI must not lose the run silently."""
    if (RELEASE_DIR / "peft" / "__init__.py").is_file():
        return RELEASE_DIR
    reason = (
        f"PEFT {RELEASE} is not installed in {RELEASE_DIR} (bash .ci/setup installs it: "
        f"pip install --no-deps --target {RELEASE_DIR} peft=={RELEASE})"
    )
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI runs this test", pytrace=False)
    pytest.skip(reason)


def run_release(directory: Path, flags: Sequence[str], conftest: str = "") -> ReleaseRun:
    """Run pytest with the plugin ``flags`` in the empty ``directory`` against the release
    (``--safemerge-report``, the derandomized ``ci`` Hypothesis profile), with
    :data:`CONFTEST` and ``conftest`` (more hooks) as the run's conftest."""
    release = release_dir()
    (directory / "conftest.py").write_text(CONFTEST + conftest)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--safemerge-report=report.json",
        "--hypothesis-profile=ci",
        *flags,
    ]
    paths = [str(release), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    output = done.stdout[-5000:] + done.stderr[-5000:]
    report, imported = directory / "report.json", directory / "peft.json"
    assert report.is_file() and imported.is_file(), output
    rows = json.loads(report.read_text())["results"]
    return ReleaseRun(
        peft=json.loads(imported.read_text()),
        rows={row["nodeid"].split("::")[-1]: row for row in rows},
        directory=directory,
        output=output,
    )


@dataclass(frozen=True)
class Finding:
    """A bug of the release's merge (or of it with today's libraries), and its cells.

    Attributes:
        name: what is wrong, in a few words.
        cells: the cells (``test[id]``) that fail on it.
        shows: regular expressions the failure messages of those cells must match.
        fixed_in: the PEFT release (and change) that fixed it, or why it is not PEFT's.
    """

    name: str
    cells: tuple[str, ...]
    shows: tuple[str, ...]
    fixed_in: str


def assert_exactly_the_findings_fail(
    rows: dict[str, dict[str, Any]], findings: dict[str, Finding]
) -> None:
    """The failed cells of ``rows`` are exactly those of ``findings``, and each finding's
    patterns are all found in its cells' messages."""
    failed = {cell for cell, row in rows.items() if row["result"] == "failed"}
    expected = {cell for finding in findings.values() for cell in finding.cells}
    assert failed == expected, {
        cell: rows[cell]["message"] if cell in rows else "no row" for cell in failed ^ expected
    }
    for key, finding in findings.items():
        messages = "\n".join(str(rows[cell]["message"]) for cell in finding.cells)
        missing = [pattern for pattern in finding.shows if not re.search(pattern, messages)]
        assert not missing, f"{key}: {missing}\n{messages}"
