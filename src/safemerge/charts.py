"""Pictures of safemerge's JSON reports: ``safemerge report REPORT.json -o report.html|.png``.

Two kinds of report are drawn, told apart by their keys:

- a fuse report (``safemerge fuse --json``): one horizontal bar per fused layer in each
  panel, the layers down the left, shared by the panels: worst error as a fraction of its
  bound (a line at 1, the bound; a bar past it is drawn red), time, and where the report
  has them, correction bytes, the adapter's effect kept and the quantization blocks the
  merge left unchanged;
- a suite report (the plugin's ``--safemerge-report``): each contract's cells as a heatmap
  (properties down, cells across: passed, failed, unsupported, skipped; the worst error
  as a fraction of its bound written in the cell), and the model suite's layers as bars.

matplotlib is an optional dependency (``pip install 'safemerge[report]'``). Only its
``Agg`` canvas is used, never ``pyplot``: drawing needs no display and touches no global
state. The HTML is one self-contained file: the picture embedded as a PNG data URI, the
report's header and its failures as text.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safemerge.errors import SafemergeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

__all__ = ["ReportDocument", "ReportError", "figure_for", "load_report", "render"]


@dataclass(frozen=True)
class FusePanel:
    """One panel of a fuse report's picture: a bar per layer for each series (grouped
    bars when there are several), drawn when any layer has the first series' field.

    ``series`` are ``(field, legend label)``; with ``per`` set, each value is divided by
    that field of the same layer (a fraction of it)."""

    name: str
    title: str
    series: tuple[tuple[str, str], ...]
    per: str | None = None


#: The fuse report's panels, in order; fields a report lacks are not drawn.
FUSE_PANELS: tuple[FusePanel, ...] = (
    FusePanel("worst_error_of_bound", "worst error / bound", (("worst_error_of_bound", ""),)),
    FusePanel("seconds", "time (s)", (("seconds", ""),)),
    FusePanel("correction_bytes", "exact-unfuse correction (bytes)", (("correction_bytes", ""),)),
    # A quantized or QLoRA merge (fuse --quant / --base-quant): each choice's output error
    # against what the adapter was trained for, as a fraction of the adapter's effect.
    FusePanel(
        "output_error_by_choice",
        "output error / adapter effect",
        (
            ("output_error_16bit", "16-bit merge into W"),
            ("output_error_16bit_dequantized", "16-bit merge into dequant(quant(W))"),
            ("output_error_quantized", "requantized merge"),
        ),
    ),
    FusePanel("adapter_effect_kept", "adapter effect kept", (("adapter_effect_kept", ""),)),
    FusePanel(
        "blocks_unchanged",
        "quantization blocks unchanged (fraction)",
        (("blocks_unchanged", ""),),
        per="blocks",
    ),
)
#: Bar colours of a panel's series, in order.
SERIES_COLOURS = ("#1e88e5", "#43a047", "#8e24aa")
#: A cell's colour by its status.
STATUS_COLOURS = {
    "passed": "#4caf50",
    "failed": "#e53935",
    "unsupported": "#fb8c00",
    "skipped": "#d9d9d9",
}
#: The statuses in the order of their colour codes in a heatmap.
STATUSES = tuple(STATUS_COLOURS)
#: Inches per bar or per heatmap row: room for one line of label text.
_ROW_INCHES = 0.22
_DPI = 100


class ReportError(SafemergeError, ValueError):
    """A report file that is not a safemerge JSON report, or an output it cannot write."""


@dataclass(frozen=True)
class ReportDocument:
    """A parsed report: ``kind`` is ``"fuse"`` or ``"suite"``, ``data`` the JSON object."""

    kind: str
    data: dict[str, Any]
    path: Path


def load_report(path: str | Path) -> ReportDocument:
    """Read ``path`` and tell which report it is.

    Raises:
        ReportError: the file is missing, not JSON, or neither kind of report.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(
            f"{path}: no such file; give the JSON of `safemerge fuse --json` or "
            "of pytest's --safemerge-report"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: not a JSON report ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("layers"), list) and "output" in data:
        return ReportDocument("fuse", data, path)
    if isinstance(data, dict) and isinstance(data.get("results"), list) and "summary" in data:
        return ReportDocument("suite", data, path)
    raise ReportError(
        f"{path}: neither a fuse report (keys 'output' and 'layers', from `safemerge fuse "
        f"--json`) nor a suite report (keys 'summary' and 'results', from pytest's "
        f"--safemerge-report)"
    )


def render(document: ReportDocument, output: str | Path) -> Path:
    """Draw ``document`` into ``output``: a ``.png`` picture or a self-contained ``.html``.

    Raises:
        ReportError: ``output`` ends in neither ``.png`` nor ``.html``.
        ImportError: matplotlib is not installed.
    """
    output = Path(output)
    suffix = output.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ReportError(f"{output}: write a .png or an .html report")
    png = _png_bytes(figure_for(document))
    if suffix == ".png":
        _write_atomically(output, png)
    else:
        _write_atomically(output, _html_page(document, png).encode("utf-8"))
    return output


def figure_for(document: ReportDocument) -> Figure:
    """The picture of ``document``, one matplotlib ``Figure`` (panels tagged by ``gid``:
    ``"bars:<field>"`` for a fuse panel, ``"heatmap:<contract>"``, ``"bars:model:<property>"``)."""
    figure_class = _matplotlib_figure()
    if document.kind == "fuse":
        return _fuse_figure(figure_class, document.data)
    return _suite_figure(figure_class, document.data)


# The fuse report.


def _fuse_figure(figure_class: type[Figure], data: dict[str, Any]) -> Figure:
    layers = list(data["layers"])
    panels = [
        panel
        for panel in FUSE_PANELS
        if any(layer.get(panel.series[0][0]) is not None for layer in layers)
    ] or [FUSE_PANELS[0]]
    height = max(3.0, 1.6 + _ROW_INCHES * len(layers))
    figure = figure_class(figsize=(3.2 * len(panels) + 3.5, height), dpi=_DPI, layout="constrained")
    figure.suptitle(
        f"safemerge fuse: {len(layers)} layers fused into {data.get('output', '?')}", fontsize=10
    )
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    names = [str(layer.get("name", "?")) for layer in layers]
    for ax, panel in zip(axes, panels, strict=True):
        series = [
            (label, [_panel_value(layer, field, panel.per) for layer in layers])
            for field, label in panel.series
        ]
        if panel.name == "worst_error_of_bound":
            ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
            values = series[0][1]
            colours = ["#e53935" if (v or 0.0) > 1.0 else SERIES_COLOURS[0] for v in values]
            _bars(ax, names, values, colours, panel.title, gid=f"bars:{panel.name}")
        else:
            _grouped_bars(ax, names, series, panel.title, gid=f"bars:{panel.name}")
    return figure


def _panel_value(layer: dict[str, Any], field: str, per: str | None) -> float | None:
    value = _number(layer.get(field))
    if value is None or per is None:
        return value
    whole = _number(layer.get(per))
    return value / whole if whole else None


# The suite report.


def _suite_figure(figure_class: type[Figure], data: dict[str, Any]) -> Figure:
    rows: list[dict[str, Any]] = list(data["results"])
    contracts = list(dict.fromkeys(str(row.get("contract")) for row in rows))
    grids = [
        (c, _grid([r for r in rows if r.get("contract") == c])) for c in contracts if c != "model"
    ]
    model_rows = [row for row in rows if row.get("contract") == "model"]
    model_properties = list(dict.fromkeys(str(row.get("property")) for row in model_rows))
    heights = [
        1.2 + _ROW_INCHES * 1.6 * len(grid.properties) + _label_inches(grid.columns)
        for _, grid in grids
    ]
    heights += [
        1.0 + _ROW_INCHES * sum(r.get("property") == p for r in model_rows)
        for p in model_properties
    ]
    if not heights:
        heights = [1.5]
    width = max([9.0, *(2.5 + 0.42 * len(grid.columns) for _, grid in grids)])
    figure = figure_class(figsize=(min(width, 40.0), sum(heights)), dpi=_DPI, layout="constrained")
    summary = data.get("summary", {})
    figure.suptitle(
        f"safemerge suite: {_targets(rows)}: "
        + ", ".join(f"{summary.get(s, 0)} {s}" for s in ("passed", "failed", "skipped")),
        fontsize=10,
    )
    parts: list[SubFigure] = list(
        figure.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    )
    if not grids and not model_properties:
        parts[0].text(0.5, 0.5, "no cells in this report", ha="center", va="center")
    for part, (contract, grid) in zip(parts, grids, strict=False):
        _heatmap(part.subplots(), contract, grid)
    for part, prop in zip(parts[len(grids) :], model_properties, strict=False):
        group = sorted(
            (r for r in model_rows if r.get("property") == prop), key=lambda r: str(r.get("layer"))
        )
        values = [_number(row.get("worst_fraction")) for row in group]
        colours = [STATUS_COLOURS.get(str(row.get("status")), "#1e88e5") for row in group]
        ax = part.subplots()
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        _bars(
            ax,
            [str(r.get("layer")) for r in group],
            values,
            colours,
            f"model suite, {prop}: worst error / bound per layer",
            gid=f"bars:model:{prop}",
        )
    return figure


@dataclass(frozen=True)
class _Grid:
    properties: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], dict[str, Any]]


def _grid(rows: list[dict[str, Any]]) -> _Grid:
    """Properties down, cells across (a cell is its layer kind and dtype), in report order."""

    def column(row: dict[str, Any]) -> str:
        return "/".join(str(row[k]) for k in ("kind", "dtype") if row.get(k)) or "-"

    properties = list(dict.fromkeys(str(row.get("property")) for row in rows))
    columns = list(dict.fromkeys(column(row) for row in rows))
    return _Grid(properties, columns, {(str(r.get("property")), column(r)): r for r in rows})


def _heatmap(ax: Axes, contract: str, grid: _Grid) -> None:
    from matplotlib.colors import ListedColormap

    codes = [
        [
            float(STATUSES.index(cell_status))
            if (cell_status := _status(grid.cells.get((p, c))))
            else math.nan
            for c in grid.columns
        ]
        for p in grid.properties
    ]
    colours = ListedColormap([STATUS_COLOURS[s] for s in STATUSES])
    colours.set_bad("white")
    ax.imshow(
        codes,
        cmap=colours,
        vmin=-0.5,
        vmax=len(STATUSES) - 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_gid(f"heatmap:{contract}")
    ax.set_title(f"{contract} contract", fontsize=9, loc="left")
    ax.set_yticks(range(len(grid.properties)), grid.properties, fontsize=8)
    ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=7, rotation=90)
    for y, prop in enumerate(grid.properties):
        for x, col in enumerate(grid.columns):
            cell = grid.cells.get((prop, col))
            fraction = _number(cell.get("worst_fraction")) if cell else None
            if fraction is not None:
                ax.text(x, y, _short(fraction), ha="center", va="center", fontsize=6)
    handles = [_swatch(STATUS_COLOURS[s], s) for s in STATUSES]
    ax.legend(
        handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False
    )


def _targets(rows: list[dict[str, Any]]) -> str:
    """What was checked: the rows' targets (an implementation's spec, a PEFT release)."""
    targets = list(dict.fromkeys(str(row.get("target")) for row in rows if row.get("target")))
    shown = ", ".join(targets[:3])
    return shown + (f" and {len(targets) - 3} more" if len(targets) > 3 else "") or "?"


def _status(cell: dict[str, Any] | None) -> str | None:
    if cell is None:
        return None
    status = str(cell.get("status") or cell.get("result"))
    return status if status in STATUS_COLOURS else None


# Drawing helpers.


def _bars(
    ax: Axes,
    names: list[str],
    values: list[float | None],
    colours: list[str],
    title: str,
    *,
    gid: str,
) -> None:
    widths = [0.0 if v is None else v for v in values]
    ax.barh(list(range(len(names))), widths, color=colours, height=0.7)
    _label_rows(ax, names, title, gid=gid)


def _label_rows(ax: Axes, names: list[str], title: str, *, gid: str) -> None:
    ax.set_yticks(list(range(len(names))), names, fontsize=7)
    # First layer on top, as in the model (a limit, not invert_yaxis: panels share the axis).
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(left=0.0)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_gid(gid)


def _grouped_bars(
    ax: Axes,
    names: list[str],
    series: list[tuple[str, list[float | None]]],
    title: str,
    *,
    gid: str,
) -> None:
    """One bar per layer and series, the series side by side within the layer's row."""
    if len(series) == 1:
        colours = [SERIES_COLOURS[0]] * len(names)
        _bars(ax, names, series[0][1], colours, title, gid=gid)
        return
    height = 0.8 / len(series)
    for index, (label, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * height
        positions = [row + offset for row in range(len(names))]
        widths = [0.0 if v is None else v for v in values]
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        ax.barh(positions, widths, height=height, color=colour, label=label)
    _label_rows(ax, names, title, gid=gid)
    ax.legend(fontsize=6, loc="lower right")


def _swatch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


def _label_inches(columns: list[str]) -> float:
    return 0.08 * max((len(c) for c in columns), default=0)


def _number(value: Any) -> float | None:
    """A finite float, or None (absent, null, or JSON's stand-in string for inf/nan)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _short(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.2g}"


def _matplotlib_figure() -> type[Figure]:
    try:
        figure_module = importlib.import_module("matplotlib.figure")
    except ImportError as error:
        raise ImportError(
            f"safemerge report draws with matplotlib ({error}); pip install 'safemerge[report]'"
        ) from error
    figure_class: type[Figure] = figure_module.Figure
    return figure_class


def _png_bytes(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _html_page(document: ReportDocument, png: bytes) -> str:
    data = document.data
    title = f"safemerge {document.kind} report: {document.path.name}"
    facts = (
        [
            (key, data.get(key))
            for key in ("output", "parameters", "fused_parameters", "seconds", "peak_rss_bytes")
            if key in data
        ]
        if document.kind == "fuse"
        else [
            (key, data.get(key))
            for key in (
                "implementation",
                "safemerge_version",
                "model",
                "adapter",
                "quant",
                "summary",
            )
            if data.get(key)
        ]
    )
    failures = (
        [row for row in data.get("results", []) if row.get("result") == "failed"]
        if document.kind == "suite"
        else []
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left;"
        "vertical-align:top}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>",
        *(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fact(v))}</td></tr>"
            for k, v in facts
        ),
        "</table>",
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
    ]
    if failures:
        parts += ["<h2>Failed cells</h2>", "<table><tr><th>cell</th><th>message</th></tr>"]
        for row in failures:
            where = "/".join(str(row[k]) for k in ("kind", "dtype", "layer") if row.get(k))
            name = f"{row.get('contract')} {row.get('property')}" + (f" [{where}]" if where else "")
            parts.append(
                f"<tr><td>{html.escape(name)}</td><td><pre>{html.escape(str(row.get('message', '')))}</pre></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _fact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _write_atomically(output: Path, payload: bytes) -> None:
    from safemerge.io.atomic import save_bytes

    save_bytes(output, payload)
