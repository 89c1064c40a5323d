"""What ``--safemerge-model`` checks: the model's file, which of its weights, the adapter.

The plan reads only safetensors headers; each test reads its one weight when it runs, so
a model larger than memory can be checked. ``tiny`` (for the model and the adapter)
generates a small Llama-shaped model and a PEFT adapter for it in a temporary directory.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_safemerge.options import Settings
from safemerge import names

PLAN_KEY = pytest.StashKey["ModelPlan"]()
TINY = "tiny"
_FLOAT_DTYPES = names.WEIGHT_DTYPES


@dataclass
class ModelPlan:
    """The model under check and the weights each model test runs on.

    Attributes:
        source: the ``--safemerge-model`` value; ``path``: the file or directory read.
        checkpoint: the lazily opened model (headers only until a weight is read).
        eligible: every floating-point weight with two or more dimensions.
        layers: the weights checked with generated adapters.
        selection: how ``layers`` was chosen, for the report header.
        adapter: the loaded adapter set, if any; ``adapter_error`` what stopped it loading.
        adapter_layers: the adapter's layers to check (weight names).
        quant_layers: the 2-D weights to run through the quantized path.
    """

    source: str
    path: Path
    checkpoint: Any
    eligible: list[str]
    layers: list[str]
    selection: str
    adapter: Any = None
    adapter_error: str | None = None
    adapter_layers: list[str] = field(default_factory=list)
    quant_layers: list[str] = field(default_factory=list)
    temporary: Path | None = None

    def describe(self) -> list[str]:
        lines = [
            f"safemerge: model {self.source} ({self.path}): {len(self.checkpoint)} tensors, "
            f"{len(self.eligible)} floating-point weights of 2+ dimensions; {self.selection}"
        ]
        if self.adapter is not None:
            lines.append(f"safemerge: adapter {self.adapter.describe()}")
        elif self.adapter_error is not None:
            lines.append(f"safemerge: the adapter did not load: {self.adapter_error}")
        if self.quant_layers:
            lines.append(
                f"safemerge: {len(self.quant_layers)} 2-D weights also go through the "
                f"bitsandbytes quantized path"
            )
        return lines

    def read(self, name: str, settings: Settings) -> Any:
        """One weight, read now, in ``--safemerge-dtype`` (its own by default) on the device."""
        import torch

        tensor = self.checkpoint.read(name)
        if settings.dtype is not None:
            tensor = tensor.to(getattr(torch, settings.dtype))
        return tensor.to(settings.device)


def plan_for(config: pytest.Config, settings: Settings) -> ModelPlan:
    """The plan of this process (made once, from the headers only)."""
    if PLAN_KEY not in config.stash:
        config.stash[PLAN_KEY] = _make_plan(settings)
    return config.stash[PLAN_KEY]


def release(config: pytest.Config) -> None:
    plan = config.stash.get(PLAN_KEY, None)
    if plan is None:
        return
    close = getattr(plan.checkpoint, "close", None)
    if close is not None:
        close()
    if plan.temporary is not None:
        shutil.rmtree(plan.temporary, ignore_errors=True)


def _make_plan(settings: Settings) -> ModelPlan:
    import safemerge

    assert settings.model is not None
    temporary = None
    model_path: Path = Path(settings.model)
    adapter_path = Path(settings.adapter) if settings.adapter else None
    if settings.model == TINY or settings.adapter == TINY:
        temporary = Path(tempfile.mkdtemp(prefix="safemerge-tiny-"))
        tiny_model, tiny_adapter = _write_tiny(temporary)
        if settings.model == TINY:
            model_path = tiny_model
        if settings.adapter == TINY:
            adapter_path = tiny_adapter
    try:
        checkpoint = safemerge.open_checkpoint(model_path)
    except safemerge.SafemergeError as error:
        raise pytest.UsageError(f"--safemerge-model={settings.model}: {error}") from error
    eligible = [
        name
        for name in checkpoint.names
        if len(checkpoint.info(name).shape) >= 2
        and str(checkpoint.info(name).dtype).removeprefix("torch.") in _FLOAT_DTYPES
    ]
    layers, selection = _select(settings, eligible, checkpoint)
    plan = ModelPlan(settings.model, model_path, checkpoint, eligible, layers, selection)
    plan.temporary = temporary
    if adapter_path is not None:
        try:
            plan.adapter = safemerge.load_adapter(adapter_path, base=checkpoint)
        except safemerge.SafemergeError as error:
            plan.adapter_error = str(error)
        else:
            names = list(plan.adapter.layers)
            if settings.layers:
                names = [n for n in names if _matches(n, settings.layers)]
            plan.adapter_layers = names
    if settings.quant is not None:
        source = plan.adapter_layers if plan.adapter is not None else layers
        plan.quant_layers = [n for n in source if len(checkpoint.info(n).shape) == 2]
    return plan


def _matches(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def _select(settings: Settings, eligible: list[str], checkpoint: Any) -> tuple[list[str], str]:
    if settings.layers:
        chosen = [name for name in eligible if _matches(name, settings.layers)]
        if not chosen:
            examples = ", ".join(eligible[:5])
            raise pytest.UsageError(
                f"--safemerge-layers={','.join(settings.layers)} matches none of the model's "
                f"{len(eligible)} weights (e.g. {examples}); globs match whole names, so "
                f"write '*query*' rather than 'query'"
            )
        return chosen, f"checking the {len(chosen)} matching --safemerge-layers"
    limit = settings.max_layers
    if limit == 0 or len(eligible) <= limit:
        return eligible, f"checking all {len(eligible)}"
    # Every distinct (shape, dtype) first, in file order, then evenly spread others.
    firsts: dict[tuple[Any, ...], str] = {}
    for name in eligible:
        info = checkpoint.info(name)
        firsts.setdefault((tuple(info.shape), info.dtype), name)
    chosen_set = set(list(firsts.values())[:limit])
    rest = [name for name in eligible if name not in chosen_set]
    room = limit - len(chosen_set)
    if room > 0 and rest:
        step = len(rest) / room
        chosen_set.update(rest[int(i * step)] for i in range(room))
    chosen = [name for name in eligible if name in chosen_set]
    return chosen, (
        f"checking a sample of {len(chosen)} covering all {min(len(firsts), limit)} "
        f"distinct shapes (--safemerge-max-layers=0 checks all, --safemerge-layers=GLOB "
        f"picks)"
    )


def _write_tiny(directory: Path) -> tuple[Path, Path]:
    import torch

    import safemerge
    from safemerge import synthetic
    from safemerge.io.atomic import save_tensors

    model = directory / "model"
    model.mkdir()
    save_tensors(
        model / "model.safetensors",
        synthetic.tiny_state_dict(torch.bfloat16),
        {"format": "pt", "generator": "safemerge.synthetic.tiny_state_dict"},
    )
    adapter = safemerge.write_peft_adapter(directory / "adapter", synthetic.tiny_adapters())
    return model, Path(adapter)
