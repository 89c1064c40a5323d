"""Writing a model directory safely: streamed shards, an index, then one rename into place.

Everything is written into a temporary directory beside the target (same file system),
named ``.<target>.safemerge-tmp-<hex>``; every file is fsynced, then the directory is
renamed to the target's name and the parent directory is fsynced. So the target's name
holds nothing or a complete model, even if the process is killed; on an exception
(KeyboardInterrupt included) the temporary directory is removed. A killed run leaves its
temporary directory behind, under a name :func:`leftover_temporaries` finds.

Tensor bytes are written through :class:`safemerge.ShardWriter`: the shapes and
dtypes are planned up front, so each shard's header is written first and each tensor
goes to disk as soon as it is produced; memory stays of the order of the largest tensor.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from safemerge.errors import ModelWriteError
from safemerge.io.atomic import copy_file, fsync_directory, save_bytes, save_json
from safemerge.io.phases import PhaseTimes
from safemerge.io.shard_writer import ShardWriter, tensor_nbytes
from safemerge.merge.engine import waited_out

#: Hugging Face's default largest shard (``max_shard_size="5GB"`` in transformers).
DEFAULT_SHARD_SIZE = 5 * 2**30
#: Marks the temporary directory a write builds before renaming it into place.
TEMP_MARKER = ".safemerge-tmp-"
#: Marks the old model moved aside while ``overwrite=True`` renames the new one in.
OLD_MARKER = ".safemerge-old-"
#: The weight files' stem transformers loads (``model.safetensors``); diffusers components
#: use ``"diffusion_pytorch_model"``.
DEFAULT_WEIGHTS_STEM = "model"
#: Files of a model directory that hold weights: never copied beside merged weights, since
#: they would be the base's, unmerged (pickles, other frameworks' exports, indexes).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".onnx",
    ".onnx_data",
    ".msgpack",
    ".h5",
    ".gguf",
    ".tflite",
    ".ot",
)

#: One planned tensor: ``(name, shape, dtype)``.
PlanEntry = tuple[str, Sequence[int], torch.dtype]


@dataclass(frozen=True)
class WrittenModel:
    """What :func:`write_model` wrote.

    Attributes:
        path: the model directory.
        files: the weight files (shards, or ``<stem>.safetensors``), final paths, in order.
        index: ``<stem>.safetensors.index.json``, or None for a single file.
        total_size: bytes of tensor data, all shards together.
        tensors: number of tensors written.
        copied: files copied from ``copy_from``, relative to it (not those ``extra_files``
            replaced).
        added: the files written from ``extra_files``, relative to the model directory.
    """

    path: Path
    files: tuple[Path, ...]
    index: Path | None
    total_size: int
    tensors: int
    copied: tuple[str, ...]
    added: tuple[str, ...] = ()

    @property
    def shard_count(self) -> int:
        return len(self.files)


def write_model(
    directory: str | os.PathLike[str],
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    plan: Sequence[PlanEntry] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    metadata: Mapping[str, str] | None = None,
    copy_from: str | os.PathLike[str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    weights_stem: str = DEFAULT_WEIGHTS_STEM,
    overwrite: bool = False,
    phases: PhaseTimes | None = None,
    background: bool = False,
) -> WrittenModel:
    """Write named tensors as a safetensors model directory, all of it or nothing.

    Shards are ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    (Hugging Face's layout, with ``"metadata": {"total_size": ...}``); a model that fits
    in one shard is written as ``model.safetensors`` with no index (``model`` being
    ``weights_stem``). Tensors fill shards in plan order; a shard is closed when the next
    tensor would take it past ``shard_size``, and a tensor larger than ``shard_size`` gets
    a shard of its own.

    Args:
        directory: the model directory to create; it must not exist unless ``overwrite``.
        tensors: ``(name, tensor)`` pairs in plan order (a generator is consumed lazily,
            one tensor at a time), or a mapping.
        plan: ``(name, shape, dtype)`` of every tensor, in the order ``tensors`` yields
            them. Without it, ``tensors`` is read whole into memory first to make one.
        shard_size: the largest shard, in bytes of tensor data.
        metadata: each shard's safetensors metadata; ``"format": "pt"`` is added unless
            given (transformers needs it).
        copy_from: a model directory whose other files (``config.json``, tokenizer files,
            subdirectories...) are copied alongside: everything except weight files
            (:data:`WEIGHT_SUFFIXES`, ``*.index.json``) and hidden directories.
        extra_files: files to add, relative POSIX path to bytes (``{"config.json": ...}``),
            written and fsynced in the temporary directory like the rest; one of the same
            name in ``copy_from`` is not copied. No weight file, hidden or escaping name.
        weights_stem: the weight files' stem: ``"model"`` (transformers) or
            ``"diffusion_pytorch_model"`` (a diffusers component); the index follows it.
        overwrite: replace an existing ``directory``, only once the new one is complete
            (the old one is renamed aside, the new one renamed in, the old one deleted).
        phases: adds the time spent writing (``"write"``) and waiting for the disk
            (``"fsync"``) to it; the time ``tensors`` takes to produce them is not counted.
        background: write each tensor (up to :data:`BACKGROUND_LIMIT` bytes) on a helper
            thread while ``tensors`` produces the next, so the copy into the file overlaps
            that work. Only for a producer that never changes a tensor it has yielded
            (the write may still be reading it when the producer resumes).

    Returns:
        A :class:`WrittenModel`.

    Raises:
        ModelWriteError: ``directory`` exists (reason ``"exists"``); a tensor not as
            planned, missing or extra (``"plan-mismatch"``); a bad ``shard_size``, plan,
            ``weights_stem`` or ``extra_files`` name (``"bad-plan"``). Nothing is left
            under ``directory`` (or the old model is).
        Any exception ``tensors`` raises while producing a tensor, after removing the
        temporary directory.
    """
    target = Path(directory)
    if plan is None:
        items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
        plan = [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in items]
        source: Iterable[tuple[str, torch.Tensor]] = items
    else:
        source = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards = plan_shards(target, plan, shard_size)
    _check_stem(target, weights_stem)
    extra = dict(extra_files or {})
    _check_extra_names(target, extra)
    check_output(target, overwrite=overwrite)
    header_metadata = {"format": "pt", **(metadata or {})}
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = new_temporary(target, TEMP_MARKER)
    phases = phases or PhaseTimes()
    try:
        names = _shard_names(weights_stem, len(shards))
        total = _write_shards(temp, names, shards, source, header_metadata, phases, background)
        index = None
        if len(shards) > 1:
            weight_map = {
                entry[0]: name for name, shard in zip(names, shards, strict=True) for entry in shard
            }
            index_name = f"{weights_stem}.safetensors.index.json"
            index = target / index_name
            save_json(
                temp / index_name,
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        with phases.timing("write"):  # small files, each fsynced as it is written
            copied = (
                _copy_others(Path(copy_from), temp, replaced=set(extra))
                if copy_from is not None
                else ()
            )
            _write_extra(temp, extra)
        with phases.timing("fsync"):
            fsync_directory(temp)
            move_into_place(temp, target, overwrite)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return WrittenModel(
        path=target,
        files=tuple(target / name for name in names),
        index=index,
        total_size=total,
        tensors=sum(len(shard) for shard in shards),
        copied=copied,
        added=tuple(extra),
    )


def plan_shards(
    directory: str | os.PathLike[str], plan: Sequence[PlanEntry], shard_size: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split a plan into shards of at most ``shard_size`` bytes of data (a larger tensor alone).

    Raises:
        ModelWriteError: ``shard_size`` not positive, a name twice, or an empty plan.
    """
    directory = Path(directory)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ModelWriteError(
            f"shard_size must be a positive number of bytes; got shard_size={shard_size!r}",
            path=directory,
            reason="bad-plan",
        )
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
    seen: set[str] = set()
    filled = 0
    for name, shape, dtype in plan:
        if name in seen:
            raise ModelWriteError(
                f"tensor {name!r} appears twice in the plan for {directory}; every name "
                f"must be unique",
                path=directory,
                reason="bad-plan",
                key=name,
            )
        seen.add(name)
        size = tensor_nbytes(shape, dtype)
        if not shards or (filled + size > shard_size and shards[-1]):
            shards.append([])
            filled = 0
        shards[-1].append((name, tuple(int(s) for s in shape), dtype))
        filled += size
    if not shards:
        raise ModelWriteError(
            f"nothing to write to {directory}: the plan lists no tensors",
            path=directory,
            reason="bad-plan",
        )
    return shards


def leftover_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Temporary directories that killed writes of ``directory`` left beside it.

    ``.<name>.safemerge-tmp-*`` are incomplete models (safe to delete);
    ``.<name>.safemerge-old-*`` is a previous model moved aside by ``overwrite=True``
    when the run was killed before deleting it (or before the new one was renamed in:
    then ``directory`` is missing and this is the model to rename back).
    """
    target = Path(directory)
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}{TEMP_MARKER}", f".{target.name}{OLD_MARKER}")
    return sorted(entry for entry in target.parent.iterdir() if entry.name.startswith(prefixes))


def files_to_copy(directory: str | os.PathLike[str]) -> list[Path]:
    """The files of a model directory that ``copy_from`` copies: all but weight files
    (:func:`is_weight_file`) and what lies in hidden directories (``.git``, ``.cache``)."""
    source = Path(directory)
    return sorted(_other_files(source)) if source.is_dir() else []


def is_weight_file(name: str) -> bool:
    """Whether a model directory's file holds weights (not to be copied beside merged ones)."""
    lowered = name.lower()
    return lowered.endswith(WEIGHT_SUFFIXES) or lowered.endswith(".index.json")


# -- the steps ----------------------------------------------------------------------------


def check_output(directory: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Refuse an output path that exists (unless ``overwrite``), or that is not a directory.

    Raises:
        ModelWriteError: with reason ``"exists"``.
    """
    target = Path(directory)
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise ModelWriteError(
            f"output {target} already exists; refusing to write over it. Choose another "
            f"output, remove it, or pass overwrite=True (it is replaced only once the new "
            f"model is complete)",
            path=target,
            reason="exists",
        )
    if target.is_symlink() or not target.is_dir():
        raise ModelWriteError(
            f"output {target} exists and is not a directory (a file or a link); refusing to "
            f"replace it with a model directory: remove it yourself if you mean to",
            path=target,
            reason="exists",
        )


def new_temporary(target: Path, marker: str) -> Path:
    """Create an empty directory ``.<target name><marker><hex>`` beside ``target``.

    Beside it, so that renaming it onto ``target`` stays on one file system (atomic). The
    name is fresh (a name already taken is skipped); ``marker`` is :data:`TEMP_MARKER`
    for a directory being built, :data:`OLD_MARKER` for an old one moved aside, so that
    :func:`leftover_temporaries` finds what a killed run left.
    """
    while True:
        temp = target.parent / f".{target.name}{marker}{secrets.token_hex(4)}"
        try:
            temp.mkdir()
        except FileExistsError:
            continue
        return temp


def move_into_place(temp: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete directory ``temp`` to ``target`` and fsync the parent.

    With ``overwrite`` and an existing ``target``, the old one is first renamed aside
    (:data:`OLD_MARKER`), then the new one in, then the old one deleted: if the second
    rename fails, the old one is put back. ``target``'s name never holds a partial
    directory. The caller has fsynced ``temp``'s contents and checked ``target``
    (:func:`check_output`).
    """
    if not (overwrite and target.exists()):
        os.rename(temp, target)
        fsync_directory(target.parent)
        return
    old = new_temporary(target, OLD_MARKER)
    os.replace(target, old)  # replaces the empty placeholder directory just made
    try:
        os.rename(temp, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_directory(target.parent)
    with contextlib.suppress(OSError):
        shutil.rmtree(old)


def _check_stem(target: Path, stem: str) -> None:
    """A weights stem is one plain file name part: the files must land in the directory."""
    if not stem or stem.startswith(".") or "/" in stem or os.sep in stem:
        raise ModelWriteError(
            f"weights_stem={stem!r} for {target} is not a plain file name stem (such as "
            f"'model' or 'diffusion_pytorch_model')",
            path=target,
            reason="bad-plan",
        )


def _check_extra_names(target: Path, extra: Mapping[str, bytes]) -> None:
    """Refuse, before anything is written, an extra file that would land outside the
    model, in a hidden folder, or among the weight files (which only the tensors make)."""
    for name in extra:
        parts = name.split("/")  # an absolute name starts with an empty part
        if any(part == "" or part.startswith(".") for part in parts) or is_weight_file(name):
            raise ModelWriteError(
                f"extra file {name!r} for {target} must be a relative path inside the model "
                f"(no '..', no hidden part) and not a weight file",
                path=target,
                reason="bad-plan",
                key=name,
            )


def _shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{number:05d}-of-{count:05d}.safetensors" for number in range(1, count + 1)]


def _write_shards(
    temp: Path,
    names: Sequence[str],
    shards: Sequence[Sequence[tuple[str, tuple[int, ...], torch.dtype]]],
    source: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
    phases: PhaseTimes,
    background: bool,
) -> int:
    """Stream ``source`` into the shards, checking it against the plan; total data bytes."""
    produced = iter(source)
    total = 0
    with _Handoff(background) as handoff:
        for name, shard in zip(names, shards, strict=True):
            with phases.timing("write"):
                writer = ShardWriter(temp / name, shard, metadata)
            with writer:
                try:
                    for planned, shape, dtype in shard:
                        tensor_name, tensor = _next_tensor(produced, temp, planned)
                        _check_planned(temp, planned, shape, dtype, tensor_name, tensor)
                        with phases.timing("write"):
                            handoff.write(writer, planned, tensor)
                        del tensor
                    with phases.timing("write"):
                        handoff.wait()
                except BaseException:
                    handoff.drain()  # before the file is closed under a write in flight
                    raise
                with phases.timing("fsync"):
                    writer.close()
                total += writer.data_bytes
    extra = next(produced, None)
    if extra is not None:
        raise _mismatch(temp, str(extra[0]), "was produced after every planned tensor")
    return total


def _check_planned(
    temp: Path,
    planned: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    name: str,
    tensor: object,
) -> None:
    if name != planned:
        raise _mismatch(temp, name, f"came where the plan has {planned!r} (plan order)")
    if not isinstance(tensor, torch.Tensor):
        raise _mismatch(temp, planned, f"is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise _mismatch(
            temp,
            planned,
            f"is {tensor.dtype} {tuple(tensor.shape)} but the plan says {dtype} {shape}",
        )


#: The largest tensor :func:`write_model` (``background=True``) writes on its helper
#: thread: the one written in the background is held while the next one is made, so
#: memory grows by at most this much. A larger tensor (an embedding) is written at once.
BACKGROUND_LIMIT = 64 * 2**20


class _Handoff:
    """Tensor writes, at most one at a time on a helper thread, or all on the caller's.

    ``os.pwrite`` releases the GIL, so the copy of one tensor into the file runs while
    the caller reads and fuses the next (on a 2-core machine, a fifth of a fuse's time
    was this copy). Each write waits for the one before: one tensor in flight at most.
    """

    def __init__(self, background: bool) -> None:
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="safemerge-write") if background else None
        )
        self._pending: Future[None] | None = None

    def write(self, writer: ShardWriter, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` in the background (or now, if large), once the last write is done."""
        self.wait()
        if self._executor is None or tensor.nbytes > BACKGROUND_LIMIT:
            writer.write(name, tensor)
        else:
            self._pending = self._executor.submit(writer.write, name, tensor)

    def wait(self) -> None:
        """Wait for the write in flight; its exception, if it failed, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def drain(self) -> bool:
        """Wait for the write in flight, whatever happens: on the way out of an error
        (which wins over the write's own), the file must not be closed under it. Returns
        whether a Ctrl-C came meanwhile (held until the write is done)."""
        pending, self._pending = self._pending, None
        # A write takes a fraction of a second.
        return pending is not None and waited_out([pending]) is not None

    def __enter__(self) -> _Handoff:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        interrupted = self.drain()
        if self._executor is not None:
            self._executor.shutdown()
        if interrupted and exc_type is None:  # a Ctrl-C while the last write finished
            raise KeyboardInterrupt


def _next_tensor(
    produced: Iterator[tuple[str, torch.Tensor]], temp: Path, planned: str
) -> tuple[str, torch.Tensor]:
    try:
        return next(produced)
    except StopIteration:
        raise _mismatch(temp, planned, "was planned but never produced") from None


def _mismatch(temp: Path, name: str, what: str) -> ModelWriteError:
    target = temp.parent / temp.name.split(TEMP_MARKER)[0].removeprefix(".")
    return ModelWriteError(
        f"cannot write {target}: tensor {name!r} {what}. Nothing was written; this is a "
        f"bug in the code producing the tensors",
        path=target,
        reason="plan-mismatch",
        key=name,
    )


def _copy_others(source: Path, temp: Path, *, replaced: set[str]) -> tuple[str, ...]:
    """Copy every regular file of ``source`` that is no weight file, keeping subdirectories;
    those named in ``replaced`` (relative POSIX paths) are left for the extra files."""
    copied: list[str] = []
    for path in files_to_copy(source):
        relative = path.relative_to(source)
        if relative.as_posix() in replaced:
            continue
        destination = temp / relative
        if destination.parent != temp and not destination.parent.exists():
            destination.parent.mkdir(parents=True)
        copy_file(path, destination)
        copied.append(relative.as_posix())
    for folder in sorted({(temp / name).parent for name in copied}, reverse=True):
        fsync_directory(folder)
    return tuple(copied)


def _write_extra(temp: Path, extra: Mapping[str, bytes]) -> None:
    """Write the extra files into ``temp``, each fsynced, and the folders that gained one."""
    for name, payload in extra.items():
        destination = temp / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        save_bytes(destination, payload)  # fsyncs the file and its folder
    # Each subfolder on the way holds a new entry (a file, or a folder made here): sync
    # them deepest first; ``temp`` itself is synced by the caller.
    parts = [name.split("/") for name in extra]
    folders = {temp.joinpath(*part[:depth]) for part in parts for depth in range(1, len(part))}
    for folder in sorted(folders, reverse=True):
        fsync_directory(folder)


def _other_files(folder: Path) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.is_dir():
            if not entry.name.startswith("."):  # .git, .cache, .ipynb_checkpoints...
                yield from _other_files(entry)
        elif entry.is_file() and not is_weight_file(entry.name):
            yield entry
