"""A diffusers pipeline directory read as its weight components, each a lazy checkpoint.

A pipeline directory (``DiffusionPipeline.save_pretrained``) holds ``model_index.json``
and one folder per component: models with weights (``unet/`` or ``transformer/``,
``text_encoder*/``, ``vae/``: ``config.json`` beside ``diffusion_pytorch_model.safetensors``
or ``model.safetensors``, or their shards and index) and folders without (scheduler,
tokenizers). Adapters address a component by its folder name (``"unet."``,
``"text_encoder_2."``), so the pipeline is seen here as one namespace of weight names
``"<component>.<weight>"`` (:meth:`Pipeline.shapes`), and an adapter mapped onto it is
split back into one adapter per component (:func:`split_by_component`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from safemerge.errors import CheckpointError
from safemerge.io.adapter_formats import AdapterSet
from safemerge.io.checkpoint import Checkpoint, open_checkpoint, read_json
from safemerge.io.writer import is_weight_file

#: The file that makes a directory a diffusers pipeline.
MODEL_INDEX_NAME = "model_index.json"


def is_pipeline_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a diffusers pipeline directory (it holds ``model_index.json``)."""
    return (Path(path) / MODEL_INDEX_NAME).is_file()


@dataclass(frozen=True)
class Component:
    """One weight component of a pipeline: its folder, checkpoint and weight file name.

    Attributes:
        name: the folder's name, as ``model_index.json`` and adapter keys name it.
        path: the folder.
        checkpoint: its weights, opened lazily.
        weights_stem: the stem its weight files are named by, which its library loads
            (``"diffusion_pytorch_model"`` for diffusers models, ``"model"`` for
            transformers ones): a fused copy must keep it.
    """

    name: str
    path: Path
    checkpoint: Checkpoint
    weights_stem: str


class Pipeline:
    """A pipeline directory's weight components, opened lazily; use :func:`open_pipeline`."""

    def __init__(self, path: Path, components: Mapping[str, Component]) -> None:
        self.path = path
        self.components = dict(components)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of every component, named ``"<component>.<weight>"``, to its shape."""
        return {
            f"{component.name}.{name}": component.checkpoint.info(name).shape
            for component in self.components.values()
            for name in component.checkpoint.names
        }

    def __iter__(self) -> Iterator[Component]:
        return iter(self.components.values())


def open_pipeline(path: str | os.PathLike[str], stack: ExitStack) -> Pipeline:
    """Open every weight component of the pipeline directory ``path``, each checkpoint
    closed with ``stack``.

    A component is a folder that ``model_index.json`` names and that holds weight files;
    each is opened with :func:`~safemerge.io.checkpoint.open_checkpoint`, so a pickled,
    truncated or ambiguous one fails here, before anything is done.

    Raises:
        CheckpointError: ``model_index.json`` unreadable or not an object; a component's
            weights unreadable, pickled or ambiguous; no component with weights.
    """
    directory = Path(path)
    index_file = directory / MODEL_INDEX_NAME
    index = read_json(index_file)
    if not isinstance(index, dict):
        raise CheckpointError(
            f"{index_file} is not a JSON object; regenerate it with save_pretrained",
            path=index_file,
            reason="corrupt",
        )
    components: dict[str, Component] = {}
    for name in sorted(index):
        folder = directory / name
        if name.startswith("_") or not folder.is_dir() or not _holds_weights(folder):
            continue
        checkpoint = stack.enter_context(open_checkpoint(folder))
        components[name] = Component(name, folder, checkpoint, _weights_stem(checkpoint))
    if not components:
        raise CheckpointError(
            f"pipeline directory {directory} has no component with weights: none of the "
            f"folders {MODEL_INDEX_NAME} names holds a .safetensors file",
            path=directory,
            reason="no-safetensors",
        )
    return Pipeline(directory, components)


def split_by_component(adapter_set: AdapterSet, pipeline: Pipeline) -> dict[str, AdapterSet]:
    """``adapter_set``, mapped onto :meth:`Pipeline.shapes`, as one set per component it
    adapts, each keyed by the component's own weight names."""
    split: dict[str, AdapterSet] = {}
    for component in pipeline:
        prefix = f"{component.name}."
        own = [name for name in adapter_set.layers if name.startswith(prefix)]
        if not own:
            continue
        split[component.name] = dataclasses.replace(
            adapter_set,
            layers={name.removeprefix(prefix): adapter_set.layers[name] for name in own},
            kinds={
                name.removeprefix(prefix): adapter_set.kinds[name]
                for name in own
                if name in adapter_set.kinds
            },
            sources={
                name.removeprefix(prefix): adapter_set.sources[name]
                for name in own
                if name in adapter_set.sources
            },
        )
    return split


def _holds_weights(folder: Path) -> bool:
    return any(entry.is_file() and is_weight_file(entry.name) for entry in folder.iterdir())


def _weights_stem(checkpoint: Checkpoint) -> str:
    """``"diffusion_pytorch_model"`` from ``diffusion_pytorch_model-00001-of-00002.safetensors``."""
    first = checkpoint.files[0].name if checkpoint.files else "model.safetensors"
    stem = first.removesuffix(".safetensors")
    shard_tail = stem.rsplit("-", 3)
    if len(shard_tail) == 4 and shard_tail[2] == "of":  # "<stem>-00001-of-00002"
        return shard_tail[0]
    return stem
