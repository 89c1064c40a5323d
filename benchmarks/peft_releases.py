"""The conformance suite against several PEFT releases: which cells fail, which are skipped.

What it does: for each release given, runs ``pytest --safemerge-impl=safemerge.peft:PEFT_LORA``
(the tensor and layer suites over PEFT's own LoRA merge) in a child process, from an empty
directory, with that release first on ``PYTHONPATH`` (it shadows the installed PEFT; the
child prints the version and path of the PEFT it imported, and the run stops if it is not
the one asked for), Hypothesis derandomized. Then it prints one matrix, a row per cell that
did not pass everywhere, a column per release (``.`` passed, ``F`` failed, ``s`` skipped),
then, per release, the reasons of its skipped cells and the first line of each failure.

A release is a directory holding a ``peft`` package (``pip install --no-deps --target DIR
peft==X`` makes one), or a version, installed that way into ``--cache`` (once) unless a
directory of that name is there. ``installed`` is the PEFT of this environment.

To bisect a change in PEFT's merge, from the repository root::

    python benchmarks/peft_releases.py 0.10.0 0.15.2 0.20.0 installed
    python benchmarks/peft_releases.py /path/to/peft/src --examples 300 -k "conv3d"
    python benchmarks/peft_releases.py 0.17.1 0.18.0 --json matrix.json

(a git checkout's ``src`` directory is a release too: bisect with ``git bisect run`` over a
script that greps the matrix). Each release takes 2 to 5 minutes with the default
``--examples 40`` on two cores. It exits 0 whatever the cells say; 1 when a run wrote no
report (the child's output is printed) or imported another PEFT than the one asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = "safemerge.peft:PEFT_LORA"
#: Written by the child (``peft.json``): the version and path of the PEFT it imported.
CONFTEST = """
import json

import peft


def pytest_configure(config):
    with open("peft.json", "w") as stream:
        json.dump({"version": peft.__version__, "path": peft.__file__}, stream)
"""
MARKS = {"passed": ".", "failed": "F", "skipped": "s"}


@dataclass
class Release:
    """One PEFT release and what the suite said of it."""

    name: str
    path: Path | None  # None: the installed PEFT
    version: str = ""
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve(name: str, cache: Path) -> Release:
    """``name`` as a release: ``installed``, a directory holding ``peft``, or a version."""
    if name == "installed":
        return Release(name, None)
    path = Path(name)
    if (path / "peft" / "__init__.py").is_file():
        return Release(name, path.resolve())
    target = cache / f"peft-{name}"
    if not (target / "peft" / "__init__.py").is_file():
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        subprocess.run(
            [*pip, "--target", str(target), f"peft=={name}"],
            check=True,
        )
    return Release(name, target)


def run(release: Release, pytest_args: list[str], timeout: float) -> None:
    """Run the suites against ``release`` and fill its version and rows, or exit 1."""
    env = dict(os.environ, CI="true")
    if release.path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(release.path), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="peft-release-") as directory:
        Path(directory, "conftest.py").write_text(CONFTEST)
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--safemerge-impl={SPEC}",
            "--safemerge-report=report.json",
            "--hypothesis-profile=ci",
            "-n",
            "0",
            "-q",
            *pytest_args,
        ]
        done = subprocess.run(
            command, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout
        )
        report, imported = Path(directory, "report.json"), Path(directory, "peft.json")
        if not report.is_file() or not imported.is_file():
            sys.stdout.write(done.stdout + done.stderr)
            sys.exit(f"{release.name}: the run wrote no report (its output is above)")
        peft = json.loads(imported.read_text())
        if release.path is not None and not Path(peft["path"]).is_relative_to(release.path):
            sys.exit(f"{release.name}: the run imported PEFT {peft['version']} from {peft['path']}")
        release.version = peft["version"]
        rows = json.loads(report.read_text())["results"]
        release.rows = {row["nodeid"].split("::", 1)[1]: row for row in rows}


def matrix(releases: list[Release]) -> list[str]:
    """A row per cell that did not pass in every release, a column per release."""
    cells = sorted({cell for release in releases for cell in release.rows})
    names = [f"{release.name} ({release.version})" for release in releases]
    width = max((len(cell) for cell in cells), default=4)
    lines = [" " * width + "  " + "  ".join(names)]
    for cell in cells:
        results = [release.rows.get(cell, {}).get("result", "") for release in releases]
        if all(result == "passed" for result in results):
            continue
        marks = [
            MARKS.get(result, "?").center(len(name))
            for result, name in zip(results, names, strict=True)
        ]
        lines.append(f"{cell:<{width}}  " + "  ".join(marks))
    return lines


def details(release: Release) -> list[str]:
    """The skip reasons (each once, with its count) and each failure's first line."""
    lines = [f"== PEFT {release.version} ({release.name})"]
    counts = {result: 0 for result in MARKS}
    reasons: dict[str, int] = {}
    for cell, row in sorted(release.rows.items()):
        counts[row["result"]] = counts.get(row["result"], 0) + 1
        message = str(row.get("message") or "").strip()
        if row["result"] == "skipped":
            reasons[message] = reasons.get(message, 0) + 1
        elif row["result"] == "failed":
            lines.append(f"  FAILED {cell}: {message.splitlines()[0] if message else ''}")
    lines.insert(1, "  " + ", ".join(f"{count} {result}" for result, count in counts.items()))
    lines.extend(f"  skipped ({count}): {reason}" for reason, count in sorted(reasons.items()))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="+", help="versions, directories, or 'installed'")
    parser.add_argument("--examples", type=int, default=40, help="--safemerge-examples")
    parser.add_argument("-k", dest="keyword", help="pytest -k: only these cells")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per release")
    parser.add_argument("--json", type=Path, help="also write {release: {cell: row}} here")
    # Any other option goes to pytest (e.g. --safemerge-dtypes=float32).
    args, passed_on = parser.parse_known_args(argv)
    extra = [f"--safemerge-examples={args.examples}", *passed_on]
    if args.keyword:
        extra += ["-k", args.keyword]
    releases = [resolve(name, args.cache) for name in args.releases]
    for release in releases:
        print(f"running the suites against {release.name} ...", flush=True)
        run(release, extra, args.timeout)
    print("\n".join(matrix(releases)))
    for release in releases:
        print("\n".join(details(release)))
    if args.json:
        args.json.write_text(json.dumps({r.name: r.rows for r in releases}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
