"""Writing a diffusers pipeline directory all or nothing: fused components, the rest copied.

The new pipeline is built in a temporary directory beside the target (named like
:mod:`safemerge.io.writer`'s, so :func:`~safemerge.io.writer.leftover_temporaries` finds
it): each rewritten component through :func:`~safemerge.io.writer.write_model` (its
tensors streamed, its other files copied), under the weight file names its library
loads (``weights_stem``); every other file and folder of the source copied byte for
byte. Then one rename puts it in place. An exception at any point (KeyboardInterrupt
included) removes the temporary directory: the target's name holds a complete pipeline
or nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from safemerge.io.atomic import copy_file, fsync_directory
from safemerge.io.phases import PhaseTimes
from safemerge.io.writer import (
    TEMP_MARKER,
    PlanEntry,
    check_output,
    move_into_place,
    new_temporary,
    write_model,
)


@dataclass(frozen=True)
class ComponentOutput:
    """A component to write anew: its tensors, streamed in plan order, and how to store them.

    Attributes:
        name: the component's folder.
        tensors: ``(name, tensor)`` pairs in plan order, consumed one at a time.
        plan: ``(name, shape, dtype)`` of every tensor.
        metadata: each weight file's safetensors metadata.
        weights_stem: the weight files' stem (``"diffusion_pytorch_model"``, ``"model"``).
    """

    name: str
    tensors: Iterable[tuple[str, torch.Tensor]]
    plan: Sequence[PlanEntry]
    metadata: Mapping[str, str]
    weights_stem: str


@dataclass(frozen=True)
class WrittenPipeline:
    """What :func:`write_pipeline` wrote.

    Attributes:
        path: the pipeline directory.
        files: per rewritten component, its weight files (final paths).
        total_size: bytes of tensor data written, all components together.
        tensors: number of tensors written.
        copied: files copied from the source, relative to it.
    """

    path: Path
    files: Mapping[str, tuple[Path, ...]]
    total_size: int
    tensors: int
    copied: tuple[str, ...]


def write_pipeline(
    directory: str | os.PathLike[str],
    source: str | os.PathLike[str],
    components: Sequence[ComponentOutput],
    *,
    shard_size: int,
    overwrite: bool = False,
    phases: PhaseTimes | None = None,
    background: bool = False,
) -> WrittenPipeline:
    """Write the pipeline ``source`` to ``directory`` with ``components`` rewritten, all or nothing.

    Args:
        directory: the pipeline directory to create; it must not exist unless ``overwrite``.
        source: the pipeline directory whose other files and folders are copied as they
            are (hidden ones, such as ``.git``, left out).
        components: the components to write from their tensors; their folders' other
            files (``config.json``) are copied, their old weight files are not.
        shard_size: the largest weight file of a component, in bytes.
        overwrite: replace an existing ``directory``, only once the new one is complete.
        phases: adds the time spent writing and waiting for the disk to it, as
            :func:`~safemerge.io.writer.write_model` does.
        background: write tensors on a helper thread, as ``write_model`` does (its
            condition holds for every component's producer).

    Raises:
        ModelWriteError: as :func:`~safemerge.io.writer.write_model`; nothing is left
            under ``directory`` (or the old pipeline is).
        Any exception a component's ``tensors`` raise, after removing the temporary.
    """
    target = Path(directory)
    origin = Path(source)
    check_output(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = new_temporary(target, TEMP_MARKER)
    phases = phases or PhaseTimes()
    try:
        files: dict[str, tuple[Path, ...]] = {}
        total = tensors = 0
        for component in components:
            written = write_model(
                temp / component.name,
                component.tensors,
                plan=component.plan,
                shard_size=shard_size,
                metadata=component.metadata,
                copy_from=origin / component.name,
                weights_stem=component.weights_stem,
                phases=phases,
                background=background,
            )
            files[component.name] = tuple(
                target / component.name / path.name for path in written.files
            )
            total += written.total_size
            tensors += written.tensors
        rewritten = {component.name for component in components}
        with phases.timing("write"):
            copied = tuple(_copy_rest(origin, temp, rewritten))
        with phases.timing("fsync"):
            fsync_directory(temp)
            move_into_place(temp, target, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return WrittenPipeline(target, files, total, tensors, copied)


def _copy_rest(source: Path, temp: Path, rewritten: set[str]) -> Iterator[str]:
    """Copy every file of ``source`` byte for byte, but for the rewritten components'
    folders and hidden entries; yield each path copied, relative to ``source``."""
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or entry.name in rewritten:
            continue
        if entry.is_dir():
            yield from (f"{entry.name}/{path}" for path in _copy_tree(entry, temp / entry.name))
        elif entry.is_file():
            copy_file(entry, temp / entry.name)
            yield entry.name


def _copy_tree(source: Path, target: Path) -> Iterator[str]:
    target.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from (f"{entry.name}/{path}" for path in _copy_tree(entry, target / entry.name))
        elif entry.is_file():
            copy_file(entry, target / entry.name)
            yield entry.name
    fsync_directory(target)
