"""The ``safemerge`` command line.

Exit codes:
    0  success: the check held, the adapter is safe, the model was written.
    1  a check failed: the adapter is unsafe (non-finite values, a merge that would not
       be finite in the dtype, keys that do not fit the base), or the demo found a problem.
    2  bad usage (unknown option, bad value).
    3  an input could not be read (missing, pickled, truncated or corrupt file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from safemerge import names
from safemerge._version import __version__
from safemerge.errors import (
    AdapterConfigError,
    AdapterFormatError,
    CheckpointError,
    ModelWriteError,
    SafemergeError,
)

if TYPE_CHECKING:  # the subcommands import their modules when they run
    from safemerge.inspection import AdapterScan
    from safemerge.model.report import ModelFuseReport, TensorResult

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3

_DTYPES = {name: getattr(torch, name) for name in names.WEIGHT_DTYPES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safemerge",
        description="Safe, exact and testable merging of LoRA adapters.",
        epilog="exit codes: 0 ok, 1 a check failed (unsafe adapter), 2 bad usage, "
        "3 an input could not be read",
    )
    parser.add_argument("--version", action="version", version=f"safemerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="fuse an adapter into a tiny generated model: accuracy, refusal, exact unfuse"
    )
    demo.add_argument(
        "--dtype",
        choices=names.OUTPUT_DTYPES,
        default="bfloat16",
        help="weight dtype of the model",
    )
    inspect = commands.add_parser(
        "inspect",
        help="scan an adapter without writing anything: format, ranks, alphas, non-finite "
        "values, and with --base which layers would not be finite after the merge",
    )
    inspect.add_argument("adapter", help="PEFT adapter directory, or an adapter .safetensors file")
    inspect.add_argument("--base", help="the base model (safetensors file or directory)")
    inspect.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        help="check the merge in this dtype (default: each base weight's own)",
    )
    inspect.add_argument("--scale", type=float, default=1.0, help="overall scale (lora_scale)")
    inspect.add_argument("--json", action="store_true", help="print the scan as JSON")
    fuse = commands.add_parser(
        "fuse",
        help="fuse adapters into a safetensors model and write the merged model, all or nothing",
    )
    fuse.add_argument(
        "base",
        help="the base model: a directory (shards + index), a .safetensors file, or a "
        "diffusers pipeline directory (model_index.json; layers named <component>.<weight>)",
    )
    fuse.add_argument(
        "adapters", nargs="+", metavar="ADAPTER", help="PEFT, kohya or diffusers adapters"
    )
    fuse.add_argument("--output", "-o", required=True, help="the merged model directory to create")
    fuse.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one weight per adapter (default 1 each)",
    )
    fuse.add_argument("--scale", type=float, default=1.0, help="overall scale (lora_scale)")
    fuse.add_argument(
        "--dtype", choices=sorted(_DTYPES), help="output dtype (default: each tensor's own)"
    )
    fuse.add_argument(
        "--shard-size",
        type=_size,
        default="5GB",
        help="largest shard, e.g. 2GB, 500MB (default 5GB)",
    )
    fuse.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT once the new model is complete"
    )
    fuse.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    fuse.add_argument("--json", action="store_true", help="print the report as JSON")
    fuse.add_argument(
        "--quant",
        choices=names.QUANT_TYPES,
        help="write a bitsandbytes checkpoint transformers loads quantized (guarded "
        "requantized merge into the quantized base)",
    )
    fuse.add_argument(
        "--base-quant",
        choices=names.FOUR_BIT_TYPES,
        help="QLoRA: merge into dequant(quant(W)), the weights the adapter was trained against",
    )
    fuse.add_argument("--blocksize", type=int, default=64, help="4-bit blocksize (default 64)")
    fuse.add_argument("--nested", action="store_true", help="4-bit nested absmax (double quant)")
    report = commands.add_parser(
        "report",
        help="draw a JSON report (of `safemerge fuse --json`, or pytest's --safemerge-report) "
        "as a PNG picture or one self-contained HTML page; needs safemerge[report]",
    )
    report.add_argument("report", metavar="REPORT.json", help="the JSON report to draw")
    report.add_argument(
        "--output", "-o", required=True, help="the picture to write: a .png or an .html file"
    )
    return parser


def _size(text: str) -> int:
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    number = text.strip().upper().rstrip()
    for unit in sorted(units, key=len, reverse=True):
        if unit and number.endswith(unit):
            number, factor = number[: -len(unit)], units[unit]
            break
    else:
        factor = 1
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write e.g. 5GB or 500MB"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return int(value)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "demo":
            from safemerge.demo import run_demo

            return EXIT_OK if run_demo(_DTYPES[arguments.dtype]) else EXIT_CHECK_FAILED
        if arguments.command == "inspect":
            return _inspect(arguments)
        if arguments.command == "fuse":
            return _fuse(arguments)
        if arguments.command == "report":
            return _report(arguments)
    except ModelWriteError as error:
        _error(str(error))
        return EXIT_USAGE if error.reason in ("exists", "same-as-input") else EXIT_INPUT
    except (CheckpointError, AdapterConfigError, AdapterFormatError) as error:
        _error(str(error))
        return EXIT_INPUT
    except SafemergeError as error:
        _error(str(error))
        return EXIT_CHECK_FAILED
    return EXIT_USAGE


def _report(arguments: argparse.Namespace) -> int:
    from safemerge import charts

    if not arguments.output.lower().endswith((".png", ".html", ".htm")):
        _error(f"--output {arguments.output}: write a .png or an .html report")
        return EXIT_USAGE
    try:
        document = charts.load_report(arguments.report)
    except charts.ReportError as error:
        _error(str(error))
        return EXIT_INPUT
    try:
        written = charts.render(document, arguments.output)
    except ImportError as error:
        _error(str(error))
        return EXIT_USAGE
    print(f"{document.kind} report {arguments.report} drawn to {written}")
    return EXIT_OK


def _error(message: str) -> None:
    print(f"safemerge: error: {message}", file=sys.stderr)


def _inspect(arguments: argparse.Namespace) -> int:
    from safemerge.inspection import inspect_adapter

    dtype = _DTYPES[arguments.dtype] if arguments.dtype else None
    scan = inspect_adapter(
        arguments.adapter, base=arguments.base, dtype=dtype, scale=arguments.scale
    )
    if arguments.json:
        print(json.dumps(scan.to_json(), indent=2))
    else:
        print(_inspect_table(scan))
    return EXIT_OK if scan.safe else EXIT_CHECK_FAILED


def _fuse(arguments: argparse.Namespace) -> int:
    from safemerge.model import quantized_export

    weights = arguments.weights or [1.0] * len(arguments.adapters)
    if len(weights) != len(arguments.adapters):
        _error(
            f"--weights has {len(weights)} value(s) for {len(arguments.adapters)} adapter(s); "
            f"give one weight per adapter, in the same order"
        )
        return EXIT_USAGE
    progress = None if arguments.quiet or arguments.json else _ProgressBar()
    quant, base_quant = quantized_export.quant_specs(
        arguments.quant,
        arguments.base_quant,
        blocksize=arguments.blocksize,
        nested=arguments.nested,
    )
    report = quantized_export.export_files(
        arguments.base,
        list(zip(arguments.adapters, weights, strict=True)),
        arguments.output,
        scale=arguments.scale,
        dtype=_DTYPES[arguments.dtype] if arguments.dtype else None,
        shard_size=arguments.shard_size,
        overwrite=arguments.overwrite,
        progress=progress,
        quant=quant,
        base_quant=base_quant,
    )
    if progress is not None:
        progress.finish()
    if arguments.json:
        document = _report_json(report)
        document["qlora"] = quantized_export.qlora_overall(report)
        print(json.dumps(document, indent=2))
    else:
        print(_fuse_summary(report))
        comparison = quantized_export.qlora_summary(report)
        if comparison is not None:
            print(f"\n{comparison}")
    return EXIT_OK


class _ProgressBar:
    """One line on stderr, redrawn per tensor: ``[#####.....] 37/104 layers.3.q_proj.weight``."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self.drawn = False

    def __call__(self, result: TensorResult) -> None:
        total = max(result.total, 1)
        filled = self.width * result.position // total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {result.position}/{total} {result.name}"
        if sys.stderr.isatty():
            print(f"\r{line[:120]:<120}", end="", file=sys.stderr, flush=True)
        elif result.position == total or result.position % max(total // 20, 1) == 0:
            print(line, file=sys.stderr, flush=True)
        self.drawn = True

    def finish(self) -> None:
        if self.drawn and sys.stderr.isatty():
            print(file=sys.stderr)


def _fuse_summary(report: ModelFuseReport) -> str:
    fused = [layer for layer in report.layers if layer.fused]
    rows = [("layer", "kind", "shape", "dtype", "worst err/bound", "time")]
    for layer in fused:
        worst = "-" if layer.worst_error_of_bound is None else f"{layer.worst_error_of_bound:.3f}"
        rows.append(
            (
                layer.name,
                layer.kind,
                "x".join(str(size) for size in layer.shape),
                str(layer.dtype).removeprefix("torch."),
                worst,
                f"{layer.seconds * 1000:.0f} ms",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    worst_all = max((layer.worst_error_of_bound or 0.0 for layer in fused), default=0.0)
    lines += [
        "",
        f"fused {len(fused)} layers ({report.fused_parameters:,} parameters), worst error "
        f"{worst_all:.3f} of its bound; wrote {report.tensors_written} tensors "
        f"({report.parameters:,} parameters) in {report.shard_count} shard(s) to {report.output}",
        f"time {report.seconds:.2f} s ({report.parameters / max(report.seconds, 1e-9) / 1e6:.1f} "
        f"M parameters/s); peak memory {report.peak_rss_bytes / 2**20:.0f} MiB",
    ]
    return "\n".join(lines)


def _report_json(report: ModelFuseReport) -> dict[str, Any]:
    return {
        "output": str(report.output),
        "shards": report.shard_count,
        "parameters": report.parameters,
        "fused_parameters": report.fused_parameters,
        "tensors_written": report.tensors_written,
        "seconds": report.seconds,
        # Seconds per phase, "other" the rest of "seconds"; absent where not measured.
        "phases": {**report.phases, "other": report.other_seconds} if report.phases else {},
        "peak_rss_bytes": report.peak_rss_bytes,
        "metadata": dict(report.metadata),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "dtype": str(layer.dtype).removeprefix("torch."),
                "worst_error_of_bound": layer.worst_error_of_bound,
                "seconds": layer.seconds,
                "adapters": layer.adapters,
                **(layer.qlora or {}),
            }
            for layer in report.layers
            if layer.fused
        ],
    }


def _inspect_table(scan: AdapterScan) -> str:
    lines = [
        f"{scan.format} adapter {scan.path} (sha256 {scan.digest[:12]}): {len(scan.layers)} layers"
        + (f", checked against {scan.base}" if scan.base else "")
        + (f" in {scan.dtype}" if scan.dtype else "")
        + (f" at scale {scan.scale:g}" if scan.scale != 1.0 else ""),
        "",
    ]
    header = ("layer", "rank", "alpha", "scale", "non-finite", "merge")
    rows = [header]
    for layer in scan.layers:
        non_finite = "; ".join(
            f"{key}: " + ", ".join(f"{count} {kind}" for kind, count in counts.items())
            for key, counts in layer.non_finite.items()
        )
        merge = layer.merge + (f" ({layer.merge_detail})" if layer.merge_detail else "")
        rows.append(
            (
                layer.base_weight or layer.name,
                str(layer.rank),
                f"{layer.alpha:g}",
                f"{layer.scale:g}",
                non_finite or "none",
                merge,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.append("")
    for problem in scan.problems:
        lines.append(f"problem: {problem}")
    unsafe = [layer for layer in scan.layers if not layer.safe]
    if scan.safe:
        lines.append("result: safe to merge")
    else:
        lines.append(
            f"result: UNSAFE: {len(unsafe)} layer(s) with non-finite values or a merge that "
            f"would not be finite, {len(scan.problems)} problem(s) reading it against the base"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
