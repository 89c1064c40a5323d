"""Adapter files (PEFT, kohya, old diffusers) read into one LoraAdapter per base weight.

Every adapter layer must map to exactly one base weight, with shapes that fit it; any key
that does not (unmatched, ambiguous, half a pair, wrong shape, wrong rank) is reported,
all of them together, in one :class:`AdapterFormatError`, and nothing is loaded. Files
are read only through :mod:`safemerge.files`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safemerge.errors import AdapterConfigError, AdapterFormatError, CheckpointError
from safemerge.io.adapter_keys import (
    PEFT_PREFIX,
    ParsedKeys,
    detect_format,
    is_diffusers_layout,
    parse_diffusers,
    parse_kohya,
    parse_peft,
    pattern_key,
    refuse_zero_rank,
)
from safemerge.io.atomic import file_digest, save_json, save_tensors
from safemerge.io.base_match import (
    BaseIndex,
    PipelineIndex,
    ambiguous,
    base_shapes,
    build_adapter,
    unmatched,
)
from safemerge.io.checkpoint import Checkpoint, read_json, read_tensors
from safemerge.io.header import refuse_pickle
from safemerge.merge.adapter import LoraAdapter

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# Where a single safetensors file may carry its PEFT config, as JSON text in the metadata
# (diffusers writes "lora_adapter_metadata", keyed by component: {"unet.r": 4, ...}).
_CONFIG_METADATA_KEYS = ("lora_adapter_metadata", "adapter_config", "peft_config")
_PROBLEM_CAP = 20


@dataclass(frozen=True, eq=False)
class AdapterSet:
    """An adapter file read and mapped onto a base model: one :class:`LoraAdapter` per weight.

    Attributes:
        format: ``"peft"``, ``"kohya"`` or ``"diffusers"``.
        path: the adapter file or directory.
        layers: the adapters, keyed by the base weight's name (``"...query.weight"``).
        config: the PEFT config (``adapter_config.json`` or the file's metadata); for
            kohya and diffusers files, the file's metadata.
        digest: SHA-256 (hex) of the adapter weight file's bytes.
        kinds: each layer's kind, keyed like ``layers``: ``"linear"``,
            ``"fan_in_fan_out"`` (weight stored ``(in, out)``), ``"embedding"`` (weight
            ``(num_embeddings, dim)``), ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``.
        sources: the module name each layer had in the adapter file, keyed like ``layers``.
    """

    format: str
    path: Path
    layers: dict[str, LoraAdapter]
    config: dict[str, Any]
    digest: str
    kinds: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One paragraph: format, layer count and kinds, ranks, alphas, scales and options."""
        adapters = list(self.layers.values())
        if not adapters:
            return f"{self.format} adapter {self.path}: no layers (sha256 {self.digest[:12]})."
        kinds = Counter(self.kinds.get(name, "linear") for name in self.layers)
        ranks = Counter(adapter.rank for adapter in adapters)
        alphas = Counter(_alpha_of(adapter) for adapter in adapters)
        scales = Counter(adapter.scale for adapter in adapters)
        parts = [
            f"{self.format} adapter {self.path}: {len(adapters)} layer(s) "
            f"({_counted(kinds)}); rank {_counted(ranks)}; alpha {_counted(alphas)}; "
            f"scale {_counted(scales)}"
        ]
        options = {
            "rsLoRA": sum(adapter.use_rslora for adapter in adapters),
            "DoRA": sum(adapter.is_dora for adapter in adapters),
            "lora_bias": sum(adapter.lora_bias is not None for adapter in adapters),
            "fan_in_fan_out": sum(adapter.fan_in_fan_out for adapter in adapters),
        }
        parts += [f"{name} on {count}" for name, count in options.items() if count]
        return "; ".join(parts) + f" (sha256 {self.digest[:12]})."


def load_adapter(
    path: str | os.PathLike[str],
    *,
    base: Checkpoint | Mapping[str, torch.Tensor | Sequence[int]],
    components: Sequence[str] | None = None,
) -> AdapterSet:
    """Read an adapter and map each of its layers onto one weight of ``base``.

    Args:
        path: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``),
            or one ``.safetensors`` file with PEFT keys (config in its metadata or an
            ``adapter_config.json`` beside it), kohya keys (``lora_unet_*``, ``lora_te*_``
            with ``.lora_down/.lora_up/.alpha``) or old diffusers keys (``lora.down/up``,
            ``_lora.down/up``, ``lora_linear_layer.down/up``, with ``.alpha`` keys).
            The format is detected from the keys.
        base: the model: a :class:`~safemerge.Checkpoint`, or a mapping of weight
            name to shape (or to tensor, such as a ``state_dict()``).
        components: for a diffusers pipeline, its components' folder names; ``base``
            then names each weight ``"<component>.<weight>"``, and each adapter layer
            is looked up within the component its key names (``unet.``,
            ``text_encoder_2.``, kohya's ``lora_te2_``).

    Returns:
        The :class:`AdapterSet`, keyed by base weight name.

    Raises:
        AdapterFormatError: keys that match no base weight or several, half pairs, shapes
            or ranks that do not fit; all of them listed.
        AdapterConfigError: an unusable config: rank (``r``) not positive, a zero-rank
            tensor, an unsupported PEFT option, no config for a PEFT file.
        CheckpointError: a missing, pickled, truncated or corrupt file.
    """
    raw_adapter = read_raw_adapter(path)
    path, parsed = raw_adapter.path, raw_adapter.parsed
    shapes = base_shapes(base)
    index = BaseIndex(shapes) if components is None else PipelineIndex(shapes, components)
    layers: dict[str, LoraAdapter] = {}
    kinds: dict[str, str] = {}
    sources: dict[str, str] = {}
    problems = list(parsed.problems)
    for raw in parsed.layers:
        if raw.flat:
            candidates = index.resolve_flat(raw.module, raw.component)
        else:
            candidates = index.resolve(raw.module)
        if not candidates:
            problems.append((raw.label, unmatched(raw)))
            continue
        if len(candidates) > 1:
            problems.append((raw.label, ambiguous(candidates)))
            continue
        module = candidates[0]
        weight_name = f"{module}.weight"
        if weight_name in layers:
            problems.append(
                (
                    raw.label,
                    f"maps to base weight {weight_name!r}, as does {sources[weight_name]!r}",
                )
            )
            continue
        built = build_adapter(raw, shapes[weight_name], weight_name, module, index)
        if isinstance(built, str):
            problems.append((raw.label, built))
            continue
        layers[weight_name], kinds[weight_name] = built
        sources[weight_name] = raw.module
    if problems:
        raise AdapterFormatError(path, problems, cap=_PROBLEM_CAP)
    return AdapterSet(
        format=raw_adapter.format,
        path=path,
        layers=layers,
        config=raw_adapter.config,
        digest=raw_adapter.digest,
        kinds=kinds,
        sources=sources,
    )


@dataclass(frozen=True, eq=False)
class RawAdapter:
    """An adapter file parsed into its layers, before they are matched to a base model."""

    format: str
    path: Path
    config: dict[str, Any]
    parsed: ParsedKeys
    digest: str


def read_raw_adapter(path: str | os.PathLike[str]) -> RawAdapter:
    """Read and parse an adapter file (see :func:`load_adapter`) without a base model.

    Raises:
        AdapterConfigError, CheckpointError: as :func:`load_adapter`.
    """
    path = Path(path)
    weights_file, config_file = _adapter_files(path)
    tensors, metadata = read_tensors(weights_file)
    format_name = detect_format(path, tensors)
    parsed: ParsedKeys
    if format_name == "peft":
        peft_config = _peft_config(path, weights_file, config_file, metadata, tensors)
        config = {} if peft_config is None else peft_config
        parsed = parse_peft(tensors, peft_config)
    elif format_name == "kohya":
        config = dict(metadata)
        parsed = parse_kohya(tensors)
    else:
        config = dict(metadata)
        parsed = parse_diffusers(tensors, metadata)
    refuse_zero_rank(path, parsed.layers)
    return RawAdapter(format_name, path, config, parsed, file_digest([weights_file]))


def write_peft_adapter(
    directory: str | os.PathLike[str],
    layers: Mapping[str, LoraAdapter],
    *,
    base_prefix: str = PEFT_PREFIX,
    config: dict[str, Any] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> Path:
    """Write ``layers`` as a PEFT LoRA adapter directory that PEFT and :func:`load_adapter` read.

    Args:
        directory: created if missing; ``adapter_config.json`` and
            ``adapter_model.safetensors`` in it are replaced, each atomically.
        layers: adapters keyed by base weight name (``"<module>.weight"``).
        base_prefix: prefix of the keys in the weight file (PEFT's ``base_model.model.``).
        config: extra ``adapter_config.json`` fields (``base_model_name_or_path``,
            ``task_type``...); the fields that describe the layers (``r``, ``lora_alpha``,
            patterns, ``target_modules``, ``use_rslora``, ``fan_in_fan_out``, ``lora_bias``,
            ``use_dora``, ``peft_type``) are always computed from ``layers``.
        kinds: ``"embedding"`` for layers of an ``nn.Embedding`` (written as PEFT's
            ``lora_embedding_A/B``), as in :attr:`AdapterSet.kinds`; others need no entry.

    Returns:
        The directory.

    Raises:
        AdapterConfigError: a name not ending in ``.weight``, no layers, or options PEFT
            holds once per adapter (``use_rslora``, ``use_dora``, ``fan_in_fan_out``)
            differing between layers.
    """
    directory = Path(directory)
    kinds = kinds or {}
    modules = {_module_of(name): adapter for name, adapter in layers.items()}
    if not modules:
        raise AdapterConfigError("write_peft_adapter needs at least one layer; got none")
    adapters = list(modules.values())
    shared: dict[str, bool] = {}
    for option in ("use_rslora", "fan_in_fan_out"):
        shared[option] = _one_value(option, {m: getattr(a, option) for m, a in modules.items()})
    shared["use_dora"] = _one_value("use_dora", {m: a.is_dora for m, a in modules.items()})
    lora_bias = any(adapter.lora_bias is not None for adapter in adapters)
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in layers.items():
        prefix = f"{base_prefix}{_module_of(name)}."
        if kinds.get(name) == "embedding":
            tensors[prefix + "lora_embedding_A"] = adapter.lora_A
            tensors[prefix + "lora_embedding_B"] = adapter.lora_B
        else:
            tensors[prefix + "lora_A.weight"] = adapter.lora_A
            tensors[prefix + "lora_B.weight"] = adapter.lora_B
        if lora_bias:
            bias = adapter.lora_bias
            if bias is None:  # PEFT gives every layer a bias; zero adds nothing
                bias = torch.zeros(adapter.out_features, dtype=adapter.lora_B.dtype)
            tensors[prefix + "lora_B.bias"] = bias.reshape(adapter.out_features)
        if adapter.magnitude is not None:
            shape: tuple[int, ...] = (adapter.out_features,)
            if adapter.kernel_size:  # PEFT keeps a conv's magnitude as (1, out, 1, ...)
                shape = (1, adapter.out_features, *(1 for _ in adapter.kernel_size))
            tensors[prefix + "lora_magnitude_vector"] = adapter.magnitude.reshape(shape)
    ranks = {module: adapter.rank for module, adapter in modules.items()}
    alphas = {module: _alpha_of(adapter) for module, adapter in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    written: dict[str, Any] = {
        "task_type": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": None,
    }
    written.update(config or {})
    written.update(
        {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": _json_number(lora_alpha),
            "rank_pattern": _patterns(ranks, r),
            "alpha_pattern": {
                key: _json_number(value) for key, value in _patterns(alphas, lora_alpha).items()
            },
            "target_modules": sorted(modules),
            "lora_bias": lora_bias,
            **shared,
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
    # Top-level keys sorted, as PEFT writes them; pattern order kept: PEFT takes the first match.
    save_json(directory / PEFT_CONFIG_NAME, dict(sorted(written.items())))
    return directory


# -- locating the files and the format ------------------------------------------------------


def _adapter_files(path: Path) -> tuple[Path, Path | None]:
    """``(weights file, adapter_config.json or None)``."""
    if not path.exists():
        raise CheckpointError(
            f"no such adapter file or directory: {path}; pass a PEFT adapter directory "
            f"({PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME}) or a .safetensors LoRA file",
            path=path,
            reason="missing",
        )
    if not path.is_dir():
        refuse_pickle(path)
        sibling = path.parent / PEFT_CONFIG_NAME
        return path, sibling if sibling.is_file() else None
    weights = path / PEFT_WEIGHTS_NAME
    config = path / PEFT_CONFIG_NAME
    if weights.is_file():
        return weights, config if config.is_file() else None
    for pickled in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth"):
        if (path / pickled).is_file():
            refuse_pickle(path / pickled)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0], config if config.is_file() else None
    found = ", ".join(p.name for p in candidates) or "no .safetensors file"
    raise CheckpointError(
        f"adapter directory {path} has no {PEFT_WEIGHTS_NAME} (found: {found}); pass the "
        f"adapter's .safetensors file itself",
        path=path,
        reason="no-safetensors" if not candidates else "ambiguous",
    )


def _peft_config(
    path: Path,
    weights_file: Path,
    config_file: Path | None,
    metadata: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, Any] | None:
    """The PEFT config, or None for a diffusers LoRA file saved without one (alpha = r)."""
    if config_file is not None:
        config = read_json(config_file)
        if not isinstance(config, dict):
            raise AdapterConfigError(f"{config_file} is not a JSON object; regenerate it")
        return config
    for key in _CONFIG_METADATA_KEYS:
        if key in metadata:
            try:
                config = json.loads(metadata[key])
            except ValueError as error:
                raise AdapterConfigError(
                    f"{weights_file}: metadata {key!r} is not valid JSON ({error}); fix or "
                    f"remove it and put the config in {PEFT_CONFIG_NAME}"
                ) from error
            if not isinstance(config, dict):
                raise AdapterConfigError(f"{weights_file}: metadata {key!r} is not a JSON object")
            return config
    if is_diffusers_layout(tensors):
        return None
    raise AdapterConfigError(
        f"PEFT adapter {path} has no config: no {PEFT_CONFIG_NAME} beside "
        f"{weights_file.name} and no {' / '.join(_CONFIG_METADATA_KEYS)} in its metadata, so "
        f"its scale (lora_alpha / r) is unknown; put the adapter's {PEFT_CONFIG_NAME} next "
        f"to the file"
    )


# -- writing helpers -------------------------------------------------------------------------


def _module_of(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise AdapterConfigError(
            f"layer names must be base weight names ending in '.weight'; got {weight_name!r}"
        )
    return weight_name.removesuffix(".weight")


def _one_value(option: str, values: Mapping[str, bool]) -> bool:
    distinct = set(values.values())
    if len(distinct) > 1:
        on = [module for module, value in values.items() if value]
        raise AdapterConfigError(
            f"PEFT's adapter_config.json holds one {option} for all layers, but {len(on)} of "
            f"{len(values)} layers have {option}=True (e.g. {on[0]!r}); write them as separate "
            f"adapters"
        )
    return distinct.pop()


def _alpha_of(adapter: LoraAdapter) -> float:
    return float(adapter.rank) if adapter.alpha is None else float(adapter.alpha)


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """PEFT rank/alpha patterns giving each module its value under PEFT's suffix matching.

    Keys are the full module paths, escaped (PEFT reads them as regular expressions),
    longest first: a key also matches every module ending in ``"." + key``, so a module
    a shorter key would catch gets its own entry, even if it has the default value.
    """
    chosen = {module for module, value in values.items() if value != default}
    while True:
        ordered = sorted(chosen, key=lambda module: (-len(module), module))
        patterns = {re.escape(module): values[module] for module in ordered}
        wrong = {
            module
            for module, value in values.items()
            if patterns.get(pattern_key(patterns, module) or "", default) != value
            and module not in chosen
        }
        if not wrong:
            return patterns
        chosen |= wrong


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _counted(counts: Counter[Any]) -> str:
    """``"8"`` when all agree, else ``"8 (10), 16 (2)"``, most common first."""

    def shown(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    if len(counts) == 1:
        return shown(next(iter(counts)))
    ordered = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return ", ".join(f"{shown(value)} ({count})" for value, count in ordered)
