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

import torch

from safemerge import __version__
from safemerge.errors import AdapterConfigError, CheckpointError, SafemergeError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


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
        choices=["float32", "float16", "bfloat16"],
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "demo":
            from safemerge.demo import run_demo

            return EXIT_OK if run_demo(_DTYPES[arguments.dtype]) else EXIT_CHECK_FAILED
        if arguments.command == "inspect":
            return _inspect(arguments)
    except (CheckpointError, AdapterConfigError) as error:
        _error(str(error))
        return EXIT_INPUT
    except SafemergeError as error:
        _error(str(error))
        return EXIT_CHECK_FAILED
    return EXIT_USAGE


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


def _inspect_table(scan: object) -> str:
    from safemerge.inspection import AdapterScan

    assert isinstance(scan, AdapterScan)
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
