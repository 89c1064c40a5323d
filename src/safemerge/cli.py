"""The ``safemerge`` command line.

Exit codes: 0 success; 1 a check failed (the demo found a problem); 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from safemerge import __version__

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safemerge", description="Safe, exact and testable merging of LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"safemerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="fuse an adapter into a tiny generated model: accuracy, refusal, exact unfuse"
    )
    demo.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="bfloat16", help="weight dtype of the model"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        from safemerge.demo import run_demo

        return 0 if run_demo(_DTYPES[arguments.dtype]) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
