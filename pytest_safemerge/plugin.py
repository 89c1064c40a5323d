"""The pytest entry point of safemerge: options, the built-in suite's collection, fixtures,
the terminal summary and the JSON report.

Imports nothing heavy at module top (pytest loads every installed plugin on every run):
torch and safemerge are imported only when the suite runs or a fixture is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pytest_safemerge.fixtures import (
    safemerge_adapter_factory,
    safemerge_fuse,
    safemerge_impl,
    safemerge_layer_factory,
    safemerge_settings,
)
from pytest_safemerge.options import SETTINGS_KEY, add_options, read_settings
from pytest_safemerge.results import ROWS_KEY, collect_row, summary_lines, write_report

__all__ = [
    "safemerge_adapter_factory",
    "safemerge_fuse",
    "safemerge_impl",
    "safemerge_layer_factory",
    "safemerge_settings",
]

SUITE_DIR = Path(__file__).parent / "suite"
#: The PEFT contracts ``--safemerge-peft`` collects: PEFT's model-level entry points, and
#: the tuners other than LoRA that merge.
PEFT_MODULES = ("test_peft_models.py", "test_peft_tuners.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    settings = read_settings(config)
    config.stash[SETTINGS_KEY] = settings
    config.stash[ROWS_KEY] = []
    config.pluginmanager.register(_RowCollector(config.stash[ROWS_KEY]), "safemerge-rows")
    if settings.active:
        # Fail on a bad --safemerge-impl or --safemerge-model now, as a usage error,
        # rather than as an error in every test.
        from pytest_safemerge import models
        from pytest_safemerge.implementations import load_implementation

        load_implementation(settings.impl)
        if settings.pipeline is not None:
            from pytest_safemerge.suite.pipeline_contract import load_pipeline_fuse

            load_pipeline_fuse(settings.pipeline)
        if settings.model is not None:
            models.plan_for(config, settings)
        _share_cores(config)


def _share_cores(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores for torch's threads.

    Every worker is its own process with as many OpenMP threads as there are cores; on
    a small machine they spin against each other and the suite runs many times slower.
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    import torch

    workers = int(workerinput.get("workercount", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(workers, 1)))


class _RowCollector:
    """Gathers the suite's rows from test reports; under pytest-xdist the controller
    receives every worker's reports, so it gathers them all."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        collect_row(report, self.rows)


def pytest_unconfigure(config: pytest.Config) -> None:
    if SETTINGS_KEY in config.stash and config.stash[SETTINGS_KEY].model is not None:
        from pytest_safemerge import models

        models.release(config)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Add the built-in suite to whatever was collected (before -k and -m deselect)."""
    settings = config.stash[SETTINGS_KEY]
    if not settings.active:
        return
    modules = []
    if (
        settings.suite
        or settings.impl is not None
        or (
            settings.only
            and settings.model is None
            and not settings.peft
            and settings.pipeline is None
        )
    ):
        modules.append("test_contract.py")
        if _layer_suite_applies(settings.impl):
            modules.append("test_layers.py")
    if settings.model is not None:
        modules.append("test_model.py")
    if settings.peft:
        modules.extend(PEFT_MODULES)
    if settings.pipeline is not None:
        modules.append("test_pipeline.py")
    if settings.only and items:
        config.hook.pytest_deselected(items=list(items))
        items.clear()
    for module in modules:
        node = pytest.Module.from_parent(
            session, path=SUITE_DIR / module, nodeid=f"safemerge/{module}"
        )
        items.extend(session.genitems(node))


def _layer_suite_applies(spec: str | None) -> bool:
    """Whether the implementation has the module-level contract's ``fuse_layer``."""
    from pytest_safemerge.implementations import load_implementation

    return load_implementation(spec).has_fuse_layer


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash[SETTINGS_KEY]
    if not settings.active:
        return []
    from pytest_safemerge import models
    from pytest_safemerge.implementations import DEFAULT_SPEC, load_implementation

    spec = settings.impl or DEFAULT_SPEC
    implementation = load_implementation(settings.impl)
    if implementation.has_fuse_layer:
        kinds = sorted(implementation.layer_kinds)
        layers = f"layer suite collected (fuse_layer; layer_kinds: {', '.join(kinds)})"
    else:
        layers = "layer suite not collected (no fuse_layer)"
    lines = [f"safemerge: implementation under test {spec}; {layers}"]
    if settings.model is not None:
        lines.extend(models.plan_for(config, settings).describe())
    return lines


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS_KEY, [])
    if not rows:
        return
    terminalreporter.section("safemerge")
    for line in summary_lines(rows):
        terminalreporter.write_line(line)
    settings = config.stash[SETTINGS_KEY]
    if settings.report:
        terminalreporter.write_line(f"report written to {settings.report}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    settings = config.stash.get(SETTINGS_KEY, None)
    if settings is None or not settings.report or hasattr(config, "workerinput"):
        return
    import safemerge
    from pytest_safemerge.implementations import DEFAULT_SPEC

    header = {
        "safemerge_version": safemerge.__version__,
        # The tensor and layer contracts' implementation, when they ran.
        "implementation": settings.impl
        or (DEFAULT_SPEC if settings.suite or not (settings.peft or settings.pipeline) else None),
        "pipeline": settings.pipeline,
        "peft": settings.peft,
        "model": settings.model,
        "adapter": settings.adapter,
        "quant": settings.quant,
    }
    write_report(settings.report, config.stash.get(ROWS_KEY, []), header)
