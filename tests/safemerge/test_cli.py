"""The command line: the demo runs its checks, usage errors exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from safemerge import __version__
from safemerge.cli import main


def test_demo_fuses_refuses_and_restores(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dtype", "float16"]) == 0
    output = capsys.readouterr().out
    assert "result: all checks held" in output
    assert "NonFiniteMergeError" in output and "was not changed" in output
    table_rows = [line for line in output.splitlines() if "of weight" in line]
    assert len(table_rows) == 16 and all(line.rstrip().endswith("yes") for line in table_rows)


def test_demo_reports_a_failed_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import safemerge.demo as demo

    monkeypatch.setattr(demo, "unfuse", lambda layer, record, exact=True: None)  # a broken unfuse
    assert main(["demo"]) == 1
    assert "A CHECK FAILED" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["demo", "--dtype", "int8"])
    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_module_entry_point_prints_the_version() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "safemerge", "--version"], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == f"safemerge {__version__}"
