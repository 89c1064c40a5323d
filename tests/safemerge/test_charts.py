"""safemerge.charts: the pictures of real reports, one bar per layer and one heatmap cell
per suite cell, written as valid, self-contained PNG and HTML files."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

pytest.importorskip("matplotlib")

import safemerge
import safemerge.io.atomic
from safemerge import charts, synthetic
from safemerge.cli import EXIT_OK, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fuse_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSON of a real ``safemerge fuse --json`` of the tiny model."""
    root = tmp_path_factory.mktemp("fuse")
    base = root / "base"
    base.mkdir()
    safemerge.io.atomic.save_tensors(
        base / "model.safetensors", synthetic.tiny_state_dict(torch.float16)
    )
    adapter = safemerge.write_peft_adapter(root / "adapter", synthetic.tiny_adapters())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["fuse", str(base), str(adapter), "-o", str(root / "merged"), "--json"])
    assert code == EXIT_OK
    report = root / "fuse.json"
    report.write_text(printed.getvalue(), encoding="utf-8")
    return report


@pytest.fixture(scope="module")
def suite_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``--safemerge-report`` of a real, small run of the tensor, layer and model
    suites against safemerge's engine, from an empty directory."""
    root = tmp_path_factory.mktemp("suite")
    report = root / "suite.json"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0"),
            *("--safemerge-suite", "--safemerge-dtypes=float32", "--safemerge-examples=5"),
            *("--safemerge-model=tiny", "--safemerge-adapter=tiny", "--safemerge-max-layers=3"),
            *("-k", "accurate or round_trip or test_layer_merges", f"--safemerge-report={report}"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return report


def _axes(figure: Any, prefix: str) -> dict[str, Any]:
    return {
        ax.get_gid(): ax
        for ax in figure.get_axes() + [a for sub in figure.subfigs for a in sub.get_axes()]
        if (ax.get_gid() or "").startswith(prefix)
    }


def _png_size(payload: bytes) -> tuple[int, int]:
    assert payload[:8] == PNG_SIGNATURE
    assert payload[12:16] == b"IHDR"
    width, height = struct.unpack(">II", payload[16:24])
    return width, height


def test_a_fuse_report_has_one_bar_per_fused_layer_in_each_panel(fuse_report: Path) -> None:
    document = charts.load_report(fuse_report)
    layers = json.loads(fuse_report.read_text())["layers"]
    assert document.kind == "fuse" and len(layers) == 14
    panels = _axes(charts.figure_for(document), "bars:")
    assert set(panels) == {"bars:worst_error_of_bound", "bars:seconds"}
    for key, ax in panels.items():
        bars = ax.patches
        assert len(bars) == len(layers)
        field = key.removeprefix("bars:")
        assert [bar.get_width() for bar in bars] == pytest.approx([lay[field] for lay in layers])
    assert "bars:output_error_by_choice" not in panels  # not a quantized merge
    # Layers down the left in the report's order, the first on top.
    ax = panels["bars:worst_error_of_bound"]
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert labels == [layer["name"] for layer in layers]
    bottom, top = ax.get_ylim()
    assert top < bottom


def test_quantized_merge_fields_get_their_panels(fuse_report: Path, tmp_path: Path) -> None:
    """The fields ``fuse --quant`` / ``--base-quant`` add: each choice's output error side
    by side, the effect kept, and unchanged blocks as a fraction of the layer's blocks."""
    data = json.loads(fuse_report.read_text())
    layers = data["layers"]
    for index, layer in enumerate(layers):
        layer.update(
            output_error_16bit=0.5,
            output_error_16bit_dequantized=0.01,
            output_error_quantized=0.4,
            adapter_effect_kept=0.6,
            blocks=8,
            blocks_unchanged=index % 3,
        )
    changed = tmp_path / "quantized.json"
    changed.write_text(json.dumps(data))
    panels = _axes(charts.figure_for(charts.load_report(changed)), "bars:")
    assert len(panels["bars:output_error_by_choice"].patches) == 3 * len(layers)
    assert len(panels["bars:adapter_effect_kept"].patches) == len(layers)
    fractions = [bar.get_width() for bar in panels["bars:blocks_unchanged"].patches]
    assert fractions == pytest.approx([(index % 3) / 8 for index in range(len(layers))])
    legend = panels["bars:output_error_by_choice"].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [
        label for _, label in charts.FUSE_PANELS[3].series
    ]


def test_a_suite_report_has_one_heatmap_cell_per_suite_cell(suite_report: Path) -> None:
    document = charts.load_report(suite_report)
    rows = json.loads(suite_report.read_text())["results"]
    assert document.kind == "suite"
    figure = charts.figure_for(document)
    heatmaps = _axes(figure, "heatmap:")
    assert set(heatmaps) == {"heatmap:tensor", "heatmap:layer"}
    for gid, ax in heatmaps.items():
        contract = gid.removeprefix("heatmap:")
        members = [row for row in rows if row["contract"] == contract]
        properties = {row["property"] for row in members}
        columns = {"/".join(row[k] for k in ("kind", "dtype") if row[k]) for row in members}
        codes = ax.images[0].get_array()
        assert codes.shape == (len(properties), len(columns))
        # Every cell of the report is drawn, in its status's colour code.
        assert int((~numpy.ma.getmaskarray(codes)).sum()) == len(members)
        drawn = sorted(charts.STATUSES[int(code)] for code in codes.compressed())
        assert drawn == sorted(row["status"] for row in members)
    model_rows = [row for row in rows if row["contract"] == "model"]
    bars = _axes(figure, "bars:model:")
    assert model_rows and len(bars) == len({row["property"] for row in model_rows})
    assert sum(len(ax.patches) for ax in bars.values()) == len(model_rows)


@pytest.mark.parametrize("kind", ["fuse", "suite"])
def test_png_and_html_files_are_valid_and_self_contained(
    kind: str, fuse_report: Path, suite_report: Path, tmp_path: Path
) -> None:
    document = charts.load_report(fuse_report if kind == "fuse" else suite_report)
    png = charts.render(document, tmp_path / "report.png").read_bytes()
    width, height = _png_size(png)
    assert width > 400 and height > 200
    page = charts.render(document, tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1
    assert _png_size(base64.b64decode(images[0])) == (width, height)
    # Self-contained: nothing fetched from elsewhere.
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_the_html_lists_every_failed_cell(suite_report: Path, tmp_path: Path) -> None:
    data = json.loads(suite_report.read_text())
    failing = dict(data["results"][0], result="failed", status="failed", message="<bad & worse>")
    data["results"].append(failing)
    changed = tmp_path / "failing.json"
    changed.write_text(json.dumps(data))
    page = charts.render(charts.load_report(changed), tmp_path / "r.html").read_text()
    assert "Failed cells" in page and "&lt;bad &amp; worse&gt;" in page


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not a JSON report"),
        ('{"results": 3}', "neither a fuse report"),
    ],
)
def test_what_is_not_a_report_is_refused_clearly(
    content: str | None, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(charts.ReportError, match=message):
        charts.load_report(path)


def test_an_output_that_is_neither_png_nor_html_is_refused(
    fuse_report: Path, tmp_path: Path
) -> None:
    with pytest.raises(charts.ReportError, match=r"write a \.png or an \.html"):
        charts.render(charts.load_report(fuse_report), tmp_path / "report.pdf")
    assert list(tmp_path.iterdir()) == []


def test_the_report_command_draws_and_exits_by_what_went_wrong(
    fuse_report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "fuse.png"
    assert main(["report", str(fuse_report), "-o", str(picture)]) == EXIT_OK
    assert _png_size(picture.read_bytes())[0] > 400
    assert "fuse report" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.png")]) == 3
    assert main(["report", str(fuse_report), "-o", str(tmp_path / "x.pdf")]) == 2
    assert "write a .png or an .html" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fuse.png"]
