"""The tree shows the flow: no module imports one from a layer above its own.

The layers, bottom to top (docs/design.md, "Layout"): the torch-free names and the errors;
``merge`` (one weight's arithmetic); ``quant`` (bitsandbytes layers); ``layer`` (one
layer's fuse); ``io`` (files); ``model`` (whole models); ``peft``; the tools at the top;
the public front last. Inside a layer, imports form no cycle. The import graph is read
from the source with ``ast`` (function-level imports included), so a lazy import cannot
hide an upward edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
PLUGIN = ROOT / "pytest_safemerge"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("safemerge._version", "safemerge.names", "safemerge.errors"),
    ("safemerge.merge",),
    ("safemerge.quant",),
    ("safemerge.layer",),
    ("safemerge.io",),
    ("safemerge.model",),
    ("safemerge.peft", "safemerge.diffusers"),
    ("safemerge.inspection", "safemerge.synthetic", "safemerge.demo", "safemerge.charts"),
    ("safemerge.cli", "safemerge.__main__"),
    ("safemerge",),
)
#: Core modules the plugin may import besides safemerge's public front: pure math and names.
PLUGIN_MAY_IMPORT = (
    "safemerge",
    "safemerge.names",
    "safemerge.synthetic",
    "safemerge.merge.numerics",
    "safemerge.merge.bounds",
    "safemerge.merge.adapter",
    "safemerge.io.atomic",
    # The pipeline suite's SAFEMERGE_PIPELINE calls the public diffusers drop-in.
    "safemerge.diffusers",
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every ``safemerge`` module ``path`` imports, with its line."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "safemerge":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "safemerge":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (SOURCE / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    SOURCE / Path(*candidate.split("."))
                ).is_dir()
                yield (candidate if is_module else node.module), node.lineno


def _rank(module: str) -> int:
    best = -1
    for rank, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                best = rank if prefix != "safemerge" or module == "safemerge" else best
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def _graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {}
    for path in sorted((SOURCE / "safemerge").rglob("*.py")):
        edges = graph.setdefault(_module_name(path, SOURCE), {})
        for imported, line in _imports(path):
            edges.setdefault(imported, line)
    return graph


def test_every_module_is_in_a_layer() -> None:
    for module in _graph():
        _rank(module)


def test_no_module_imports_from_a_layer_above() -> None:
    upward = [
        f"{module} (layer {_rank(module)}) imports {imported} (layer {_rank(imported)}), line {line}"
        for module, edges in _graph().items()
        for imported, line in edges.items()
        if module != "safemerge" and _rank(imported) > _rank(module)
    ]
    assert upward == []


def test_no_import_cycle_inside_a_layer() -> None:
    graph = _graph()
    same_layer = {
        module: [other for other in edges if other in graph and _rank(other) == _rank(module)]
        for module, edges in graph.items()
        if module != "safemerge"
    }
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, f"import cycle: {' -> '.join((*trail, module))}"
        if module in done:
            return
        for other in same_layer.get(module, []):
            visit(other, (*trail, module))
        done.add(module)

    for module in same_layer:
        visit(module, ())


def test_the_plugin_uses_public_names_and_pure_modules_only() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted(PLUGIN.rglob("*.py"))
        for imported, line in _imports(path)
        if imported not in PLUGIN_MAY_IMPORT
    ]
    assert offending == []


def test_no_module_is_longer_than_about_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for path in [*(SOURCE / "safemerge").rglob("*.py"), *PLUGIN.rglob("*.py")]
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > 650
    }
    assert long == {}


def test_the_public_front_declares_each_name_once_for_runtime_and_type_checkers() -> None:
    import safemerge

    tree = ast.parse((SOURCE / "safemerge" / "__init__.py").read_text(encoding="utf-8"))
    guarded = next(n for n in tree.body if isinstance(n, ast.If))  # if TYPE_CHECKING:
    typed = {
        alias.asname or alias.name
        for node in ast.walk(guarded)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == set(safemerge._HOMES)
    assert set(safemerge.__all__) == {"__version__", *safemerge._HOMES}
    for name in safemerge.__all__:
        assert getattr(safemerge, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'fuze'"):
        safemerge.fuze  # noqa: B018


def test_importing_safemerge_and_its_names_costs_no_torch() -> None:
    code = (
        "import sys, safemerge, safemerge.names, pytest_safemerge.plugin; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_wheel_lists_every_package() -> None:
    """pyproject.toml names its packages explicitly: a new subpackage left out of the list
    installs from a checkout (editable) but is missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]["packages"]
    found = {_module_name(path, SOURCE) for path in (SOURCE / "safemerge").rglob("__init__.py")} | {
        _module_name(path, ROOT) for path in PLUGIN.rglob("__init__.py")
    }
    assert sorted(listed) == sorted(found)
