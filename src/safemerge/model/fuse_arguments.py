"""The checks of a file fuse's arguments, made before any input is opened."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import torch

from safemerge.errors import AdapterConfigError, ModelWriteError
from safemerge.io import writer
from safemerge.io.checkpoint import read_json
from safemerge.merge.numerics import SUPPORTED_DTYPES
from safemerge.model.transaction import check_scale, finite_weight

#: Adapters for :func:`safemerge.model.streaming.fuse_files`: paths, each optionally with
#: its weight.
AdapterPaths: TypeAlias = Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float]]


def check_fuse_arguments(
    base: Path,
    adapters: AdapterPaths,
    output: Path,
    *,
    scale: float,
    dtype: torch.dtype | None,
    overwrite: bool,
) -> list[tuple[Path, float]]:
    """The checks of :func:`safemerge.model.streaming.fuse_files`'s arguments, before any input is opened: the
    output (absent unless ``overwrite``, overlapping no input), ``scale``, ``dtype`` and
    the adapters' list; the adapters as ``(path, weight)`` pairs.

    Raises:
        ModelWriteError, AdapterConfigError: as :func:`safemerge.model.streaming.fuse_files`.
    """
    writer.check_output(output, overwrite=overwrite)
    check_scale(scale)
    _check_dtype(dtype)
    weighted_paths = _paths(adapters)
    _refuse_output_over_inputs(output, [base, *(path for path, _ in weighted_paths)])
    return weighted_paths


def _paths(adapters: AdapterPaths) -> list[tuple[Path, float]]:
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    pairs: list[tuple[Path, float]] = []
    for position, item in enumerate(adapters):
        if isinstance(item, tuple) and len(item) == 2:
            pairs.append((Path(item[0]), finite_weight(item[1], position)))
        elif isinstance(item, (str, os.PathLike)):
            pairs.append((Path(item), 1.0))
        else:
            raise AdapterConfigError(
                f"adapters[{position}] must be a path or a (path, weight) pair; got "
                f"{type(item).__name__}"
            )
    if not pairs:
        raise AdapterConfigError("no adapters given: pass at least one adapter path")
    return pairs


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise AdapterConfigError(f"dtype={dtype} is not an output dtype safemerge writes: {names}")


def output_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is written in: ``dtype`` if it is floating."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def check_config(folder: Path) -> None:
    if (folder / "config.json").is_file():
        read_json(folder / "config.json")  # a truncated config fails now, not later


def _refuse_output_over_inputs(output: Path, inputs: Sequence[Path]) -> None:
    target = output.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ModelWriteError(
                f"output {output} would overlap input {path}; the inputs are never "
                f"modified: write the merged model to a new directory",
                path=output,
                reason="same-as-input",
            )
