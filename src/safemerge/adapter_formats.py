"""Adapter files (PEFT, kohya, old diffusers) read into one LoraAdapter per base weight.

Every adapter layer must map to exactly one base weight, with shapes that fit it; any key
that does not (unmatched, ambiguous, half a pair, wrong shape, wrong rank) is reported,
all of them together, in one :class:`AdapterFormatError`, and nothing is loaded. Files
are read only through :mod:`safemerge.files`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safemerge import files
from safemerge.adapter import LoraAdapter
from safemerge.errors import AdapterConfigError, AdapterFormatError, CheckpointError
from safemerge.files import Checkpoint

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Where a single safetensors file may carry its PEFT config, as JSON text in the metadata
# (diffusers writes "lora_adapter_metadata", keyed by component: {"unet.r": 4, ...}).
_CONFIG_METADATA_KEYS = ("lora_adapter_metadata", "adapter_config", "peft_config")
# PEFT options that change what the adapter computes in ways a weight merge cannot express.
_UNSUPPORTED_PEFT_OPTIONS = (
    "alora_invocation_tokens",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
)
_PEFT_PARTS = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}
_KOHYA_KEY = re.compile(r"^lora_(?:unet|te\d?)_(?P<flat>.+?)\.(?P<part>[^.]+(?:\.weight)?)$")
_KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
_DIFFUSERS_KEY = re.compile(
    r"^(?P<stem>.+?)(?P<sep>\.lora|\.lora_linear_layer|_lora)\.(?P<side>down|up)\.weight$"
)
_DIFFUSERS_ALPHAS_METADATA_KEY = "network_alphas"
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
    path: str | os.PathLike[str], *, base: Checkpoint | Mapping[str, torch.Tensor | Sequence[int]]
) -> AdapterSet:
    """Read an adapter and map each of its layers onto one weight of ``base``.

    Args:
        path: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``),
            or one ``.safetensors`` file with PEFT keys (config in its metadata or an
            ``adapter_config.json`` beside it), kohya keys (``lora_unet_*``, ``lora_te*_``
            with ``.lora_down/.lora_up/.alpha``) or old diffusers keys (``lora.down/up``,
            ``_lora.down/up``, ``lora_linear_layer.down/up``, with ``.alpha`` keys).
            The format is detected from the keys.
        base: the model: a :class:`~safemerge.files.Checkpoint`, or a mapping of weight
            name to shape (or to tensor, such as a ``state_dict()``).

    Returns:
        The :class:`AdapterSet`, keyed by base weight name.

    Raises:
        AdapterFormatError: keys that match no base weight or several, half pairs, shapes
            or ranks that do not fit; all of them listed.
        AdapterConfigError: an unusable config: rank (``r``) not positive, a zero-rank
            tensor, an unsupported PEFT option, no config for a PEFT file.
        CheckpointError: a missing, pickled, truncated or corrupt file.
    """
    path = Path(path)
    weights_file, config_file = _adapter_files(path)
    tensors, metadata = files.read_tensors(weights_file)
    shapes = _base_shapes(base)
    format_name = _detect_format(path, tensors)
    parsed: _Parsed
    if format_name == "peft":
        config = _peft_config(path, weights_file, config_file, metadata)
        parsed = _parse_peft(tensors, config)
    elif format_name == "kohya":
        config = dict(metadata)
        parsed = _parse_kohya(tensors)
    else:
        config = dict(metadata)
        parsed = _parse_diffusers(tensors, metadata)
    _refuse_zero_rank(path, parsed.layers)
    index = _BaseIndex(shapes)
    layers: dict[str, LoraAdapter] = {}
    kinds: dict[str, str] = {}
    sources: dict[str, str] = {}
    problems = list(parsed.problems)
    for raw in parsed.layers:
        candidates = index.resolve_flat(raw.module) if raw.flat else index.resolve(raw.module)
        if not candidates:
            problems.append((raw.label, _unmatched(raw)))
            continue
        if len(candidates) > 1:
            problems.append((raw.label, _ambiguous(candidates)))
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
        built = _build_adapter(raw, shapes[weight_name], weight_name, module, index)
        if isinstance(built, str):
            problems.append((raw.label, built))
            continue
        layers[weight_name], kinds[weight_name] = built
        sources[weight_name] = raw.module
    if problems:
        raise AdapterFormatError(path, problems, cap=_PROBLEM_CAP)
    return AdapterSet(
        format=format_name,
        path=path,
        layers=layers,
        config=config,
        digest=files.file_digest([weights_file]),
        kinds=kinds,
        sources=sources,
    )


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
    files.save_tensors(directory / PEFT_WEIGHTS_NAME, tensors, {"format": "pt"})
    # Top-level keys sorted, as PEFT writes them; pattern order kept: PEFT takes the first match.
    files.save_json(directory / PEFT_CONFIG_NAME, dict(sorted(written.items())))
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
        files.refuse_pickle(path)
        sibling = path.parent / PEFT_CONFIG_NAME
        return path, sibling if sibling.is_file() else None
    weights = path / PEFT_WEIGHTS_NAME
    config = path / PEFT_CONFIG_NAME
    if weights.is_file():
        return weights, config if config.is_file() else None
    for pickled in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth"):
        if (path / pickled).is_file():
            files.refuse_pickle(path / pickled)
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


def _detect_format(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    votes: Counter[str] = Counter()
    for key in tensors:
        pieces = key.split(".")
        if any(piece in _PEFT_PARTS for piece in pieces):
            votes["peft"] += 1
        elif _KOHYA_KEY.match(key):
            votes["kohya"] += 1
        elif _DIFFUSERS_KEY.match(key):
            votes["diffusers"] += 1
    if not votes:
        shown = ", ".join(list(tensors)[:5]) or "none"
        raise AdapterFormatError(
            path,
            [
                (
                    "(all keys)",
                    f"no LoRA keys found (first keys: {shown}); safemerge reads PEFT "
                    f"(lora_A/lora_B), kohya (lora_unet_*/lora_te*_ with lora_down/lora_up) "
                    f"and old diffusers (lora.down/lora.up) adapters",
                )
            ],
        )
    if len(votes) > 1:
        raise AdapterFormatError(
            path,
            [
                (
                    "(all keys)",
                    f"keys of several formats are mixed in one file ({dict(votes)} keys); "
                    f"save each adapter in one format",
                )
            ],
        )
    return next(iter(votes))


# -- parsed layers --------------------------------------------------------------------------


@dataclass
class _RawLayer:
    """One adapter layer as found in the file, before it is matched to the base."""

    module: str  # module path (kohya: the flattened name) as the base is searched for it
    label: str  # how messages name it: the file's key stem
    flat: bool = False
    embedding: bool = False
    component: str = ""  # the config section it takes its options from (diffusers metadata)
    aliases: tuple[str, ...] = ()  # other names its alpha may be stored under
    tensors: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)
    alpha: float | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    expected_rank: tuple[int, str] | None = None  # (rank, where the config said so)
    allow_bias: bool = True
    allow_magnitude: bool = True
    require_magnitude: bool = False


@dataclass
class _Parsed:
    layers: list[_RawLayer]
    problems: list[tuple[str, str]]


def _add_part(
    layers: dict[str, _RawLayer],
    problems: list[tuple[str, str]],
    raw: _RawLayer,
    role: str,
    key: str,
    tensor: torch.Tensor,
) -> _RawLayer:
    layer = layers.setdefault(raw.label, raw)
    if role in layer.tensors:
        problems.append(
            (key, f"a second {role} for layer {raw.label!r} ({layer.tensors[role][0]!r})")
        )
    else:
        layer.tensors[role] = (key, tensor)
    return layer


def _pairs_complete(
    layers: Iterable[_RawLayer], problems: list[tuple[str, str]]
) -> list[_RawLayer]:
    complete = []
    for layer in layers:
        missing = [role for role in ("A", "B") if role not in layer.tensors]
        if missing:
            have = ", ".join(key for key, _ in layer.tensors.values())
            names = {"A": "lora_A (down)", "B": "lora_B (up)"}
            problems.append(
                (
                    layer.label,
                    f"half a pair: has {have} but no {' and no '.join(names[m] for m in missing)}; "
                    f"the file is incomplete",
                )
            )
            continue
        complete.append(layer)
    return complete


# -- PEFT -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeftOptions:
    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    fan_in_fan_out: bool
    lora_bias: bool
    use_dora: bool
    where: str


def _peft_config(
    path: Path, weights_file: Path, config_file: Path | None, metadata: Mapping[str, str]
) -> dict[str, Any]:
    if config_file is not None:
        config = files.read_json(config_file)
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
    raise AdapterConfigError(
        f"PEFT adapter {path} has no config: no {PEFT_CONFIG_NAME} beside "
        f"{weights_file.name} and no {' / '.join(_CONFIG_METADATA_KEYS)} in its metadata, so "
        f"its scale (lora_alpha / r) is unknown; put the adapter's {PEFT_CONFIG_NAME} next "
        f"to the file"
    )


def _component_configs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Split a diffusers-style ``{"unet.r": 4, "text_encoder.r": 8}`` config by component."""
    if "r" in config or "peft_type" in config or not config:
        return {"": dict(config)}
    split: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        component, dot, field_name = key.partition(".")
        if not dot:
            return {"": dict(config)}
        split.setdefault(component, {})[field_name] = value
    return split


def _peft_options(config: Mapping[str, Any], where: str) -> _PeftOptions:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterConfigError(
            f"{where}: peft_type={peft_type!r}; safemerge merges LoRA adapters only "
            f"(peft_type 'LORA')"
        )
    for option in _UNSUPPORTED_PEFT_OPTIONS:
        if config.get(option):
            raise AdapterConfigError(
                f"{where}: {option}={config[option]!r} is set; such an adapter does not "
                f"reduce to a weight delta that safemerge can merge"
            )
    r = _positive_rank(config.get("r", 8), f"{where}: r")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterConfigError(f"{where}: rank_pattern and alpha_pattern must be JSON objects")
    for pattern in (*rank_pattern, *alpha_pattern):
        try:
            re.compile(pattern)
        except re.error as error:
            raise AdapterConfigError(
                f"{where}: pattern {pattern!r} is not a valid regular expression ({error})"
            ) from error
    return _PeftOptions(
        r=r,
        lora_alpha=_finite_alpha(config.get("lora_alpha", 8), f"{where}: lora_alpha"),
        rank_pattern={
            key: _positive_rank(value, f"{where}: rank_pattern[{key!r}]")
            for key, value in rank_pattern.items()
        },
        alpha_pattern={
            key: _finite_alpha(value, f"{where}: alpha_pattern[{key!r}]")
            for key, value in alpha_pattern.items()
        },
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        lora_bias=bool(config.get("lora_bias", False)),
        use_dora=bool(config.get("use_dora", False)),
        where=where,
    )


def _positive_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterConfigError(
            f"{what}={value!r}: a LoRA rank must be a positive integer (r >= 1); a zero or "
            f"negative rank describes no adapter. Fix the config"
        )
    return value


def _finite_alpha(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterConfigError(f"{what}={value!r}: lora_alpha must be a finite number")
    return float(value)


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first pattern that PEFT would apply to ``module``, or None.

    PEFT's ``get_pattern_key``: a key matches when ``module`` equals it or ends with
    ``"." + key``, the key being a regular expression (``re.match(rf"(.*\\.)?({key})$")``).
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _parse_peft(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> _Parsed:
    problems: list[tuple[str, str]] = []
    layers: dict[str, _RawLayer] = {}
    adapter_names: dict[str, str] = {}
    components = _component_configs(config)
    options = {
        component: _peft_options(
            sub, "adapter config" + (f" for {component!r}" if component else "")
        )
        for component, sub in components.items()
    }
    for key, tensor in tensors.items():
        pieces = key.split(".")
        at = max((i for i, piece in enumerate(pieces) if piece in _PEFT_PARTS), default=None)
        if at is None:
            problems.append((key, _NOT_LORA))
            continue
        part, rest = pieces[at], pieces[at + 1 :]
        param = rest.pop() if rest and rest[-1] in ("weight", "bias") else None
        if len(rest) > 1:
            problems.append((key, "not a PEFT LoRA key (unexpected parts after " + part + ")"))
            continue
        if rest:
            adapter_names.setdefault(rest[0], key)
        role = _peft_role(part, param)
        if role is None:
            problems.append((key, f"{part} has no {param or 'plain'} tensor in PEFT's LoRA format"))
            continue
        stem = ".".join(pieces[:at])
        module = stem.removeprefix(PEFT_PREFIX)
        component = module.split(".", 1)[0] if module.split(".", 1)[0] in options else ""
        layer = _add_part(layers, problems, _RawLayer(module=module, label=stem), role, key, tensor)
        layer.embedding = layer.embedding or part.startswith("lora_embedding")
        layer.component = component
    if len(adapter_names) > 1:
        names = ", ".join(adapter_names)
        problems.append(
            (
                adapter_names[list(adapter_names)[1]],
                f"the file holds several adapters ({names}); "
                f"save each one on its own (PEFT's save_pretrained does)",
            )
        )
    complete = _pairs_complete(layers.values(), problems)
    for layer in complete:
        _apply_peft_options(layer, options.get(layer.component) or next(iter(options.values())))
    return _Parsed(complete, problems)


def _peft_role(part: str, param: str | None) -> str | None:
    if part in ("lora_A", "lora_B") and param == "weight":
        return _PEFT_PARTS[part]
    if part == "lora_B" and param == "bias":
        return "bias"
    if part.startswith("lora_embedding") and param is None:
        return _PEFT_PARTS[part]
    if part == "lora_magnitude_vector" and param in (None, "weight"):
        return "magnitude"
    return None


def _apply_peft_options(layer: _RawLayer, options: _PeftOptions) -> None:
    rank_key = pattern_key(options.rank_pattern, layer.module)
    alpha_key = pattern_key(options.alpha_pattern, layer.module)
    if rank_key is None:
        layer.expected_rank = (options.r, f"{options.where} says r={options.r}")
    else:
        rank = options.rank_pattern[rank_key]
        layer.expected_rank = (rank, f"{options.where} says rank_pattern[{rank_key!r}]={rank}")
    layer.alpha = options.lora_alpha if alpha_key is None else options.alpha_pattern[alpha_key]
    layer.use_rslora = options.use_rslora
    layer.fan_in_fan_out = options.fan_in_fan_out
    layer.allow_bias = options.lora_bias
    layer.allow_magnitude = options.use_dora
    layer.require_magnitude = options.use_dora


# -- kohya ----------------------------------------------------------------------------------


def _parse_kohya(tensors: Mapping[str, torch.Tensor]) -> _Parsed:
    problems: list[tuple[str, str]] = []
    layers: dict[str, _RawLayer] = {}
    alphas: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.match(key)
        role = _KOHYA_PARTS.get(match.group("part")) if match else None
        if match is None or role is None:
            problems.append((key, _NOT_LORA))
            continue
        stem = key[: match.start("part") - 1]
        if role == "alpha":
            alphas[stem] = (key, tensor)
            continue
        raw = _RawLayer(module=match.group("flat"), label=stem, flat=True)
        _add_part(layers, problems, raw, role, key, tensor)
    for stem, (key, _) in alphas.items():
        if stem not in layers:
            problems.append((key, "an alpha for a layer with no lora_down/lora_up in the file"))
    complete = _pairs_complete(layers.values(), problems)
    for layer in complete:
        if layer.label in alphas:
            layer.alpha = _scalar_alpha(*alphas[layer.label], problems)
        _kohya_defaults(layer)
    return _Parsed(complete, problems)


def _kohya_defaults(layer: _RawLayer) -> None:
    # kohya's sd-scripts: a missing (or zero) alpha means alpha = rank, a scale of 1.
    if layer.alpha == 0:
        layer.alpha = None
    layer.allow_bias = False
    layer.allow_magnitude = False


def _scalar_alpha(key: str, tensor: torch.Tensor, problems: list[tuple[str, str]]) -> float | None:
    if tensor.numel() != 1:
        problems.append((key, f"alpha must hold one number; got shape {tuple(tensor.shape)}"))
        return None
    return float(tensor.reshape(()).to(torch.float64))


# -- old diffusers --------------------------------------------------------------------------


def _parse_diffusers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> _Parsed:
    problems: list[tuple[str, str]] = []
    layers: dict[str, _RawLayer] = {}
    alpha_keys: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            if key.endswith(".alpha"):
                alpha_keys[key.removesuffix(".alpha")] = (key, tensor)
            else:
                problems.append((key, _NOT_LORA))
            continue
        stem = match.group("stem")
        module = stem
        if match.group("sep") == "_lora":
            # attention processors: "attn1.processor.to_q_lora" is module "attn1.to_q"
            module = stem.replace(".processor.", ".")
            if module.endswith("to_out"):
                module += ".0"
        role = "A" if match.group("side") == "down" else "B"
        raw = _RawLayer(module=module, label=stem, aliases=(stem + match.group("sep"), module))
        _add_part(layers, problems, raw, role, key, tensor)
    metadata_alphas = _metadata_alphas(metadata, problems)
    used: set[str] = set()
    complete = _pairs_complete(layers.values(), problems)
    for layer in complete:
        for name in (layer.label, *layer.aliases):
            if name in alpha_keys:
                layer.alpha = _scalar_alpha(*alpha_keys[name], problems)
                used.add(name)
                break
            if name in metadata_alphas:
                layer.alpha = metadata_alphas[name]
                break
        _kohya_defaults(layer)
    known = {name for layer in layers.values() for name in (layer.label, *layer.aliases)}
    for name, (key, _) in alpha_keys.items():
        if name not in used and name not in known:
            problems.append((key, "an alpha for a layer with no lora down/up pair in the file"))
    return _Parsed(complete, problems)


def _metadata_alphas(
    metadata: Mapping[str, str], problems: list[tuple[str, str]]
) -> dict[str, float]:
    text = metadata.get(_DIFFUSERS_ALPHAS_METADATA_KEY)
    if text is None:
        return {}
    try:
        alphas = json.loads(text)
        if not isinstance(alphas, dict):
            raise ValueError("not a JSON object")
        return {
            str(key).removesuffix(".alpha"): _finite_alpha(value, f"network_alphas[{key!r}]")
            for key, value in alphas.items()
        }
    except (ValueError, AdapterConfigError) as error:
        problems.append(
            (f"metadata {_DIFFUSERS_ALPHAS_METADATA_KEY!r}", f"unusable alphas: {error}")
        )
        return {}


# -- matching layers to the base --------------------------------------------------------------


def _base_shapes(
    base: Checkpoint | Mapping[str, torch.Tensor | Sequence[int]],
) -> dict[str, tuple[int, ...]]:
    if isinstance(base, Checkpoint):
        return {name: base.info(name).shape for name in base.names}
    if not isinstance(base, Mapping):
        raise TypeError(
            f"base must be a Checkpoint (safemerge.open_checkpoint) or a mapping of weight "
            f"name to shape; got {type(base).__name__}"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in base.items():
        if isinstance(value, torch.Tensor):
            shapes[name] = tuple(int(size) for size in value.shape)
        else:
            shapes[name] = tuple(int(size) for size in value)
    return shapes


class _BaseIndex:
    """The base's modules (``<module>.weight``), found by dotted or kohya-flattened name."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.names = set(shapes)
        modules = [name.removesuffix(".weight") for name in shapes if name.endswith(".weight")]
        self.exact: dict[str, list[str]] = {module: [module] for module in modules}
        self.by_suffix: dict[str, list[str]] = {}
        self.flat_exact: dict[str, list[str]] = {}
        self.flat_by_suffix: dict[str, list[str]] = {}
        for module in modules:
            pieces = module.split(".")
            for i in range(1, len(pieces)):
                self.by_suffix.setdefault(".".join(pieces[i:]), []).append(module)
            flat = module.replace(".", "_")
            self.flat_exact.setdefault(flat, []).append(module)
            flat_pieces = flat.split("_")
            for i in range(1, len(flat_pieces)):
                self.flat_by_suffix.setdefault("_".join(flat_pieces[i:]), []).append(module)

    def resolve(self, module: str) -> list[str]:
        """Base modules that ``module`` names: itself; else the base carrying an extra
        leading prefix; else the adapter carrying one (its longest suffix found)."""
        if module in self.exact:
            return self.exact[module]
        if module in self.by_suffix:
            return self.by_suffix[module]
        pieces = module.split(".")
        for i in range(1, len(pieces)):
            found = self.exact.get(".".join(pieces[i:]))
            if found:
                return found
        return []

    def resolve_flat(self, flat: str) -> list[str]:
        """Base modules whose name, with '.' read as '_', is ``flat`` (or ends with '_' + it)."""
        return self.flat_exact.get(flat) or self.flat_by_suffix.get(flat, [])


def _unmatched(raw: _RawLayer) -> str:
    if raw.flat:
        return (
            f"no base weight matches: no module name, with '.' read as '_', is (or ends "
            f"with) {raw.module!r}; is this adapter for another model (or another part of it)?"
        )
    return (
        f"no base weight matches: looked for {raw.module + '.weight'!r} (with or without a "
        f"leading prefix); is this adapter for another model?"
    )


def _ambiguous(candidates: Sequence[str]) -> str:
    shown = ", ".join(repr(f"{module}.weight") for module in candidates[:5])
    more = f" and {len(candidates) - 5} more" if len(candidates) > 5 else ""
    return (
        f"ambiguous: matches {len(candidates)} base weights ({shown}{more}); rename the "
        f"adapter's keys to the full module path"
    )


_NOT_LORA = (
    "not a LoRA tensor (safemerge merges lora_A/lora_B pairs only; modules_to_save, "
    "trained biases, LoHa/LoKr and other adapter kinds are not supported)"
)


def _refuse_zero_rank(path: Path, layers: Iterable[_RawLayer]) -> None:
    empty = [
        f"{key} (shape {tuple(tensor.shape)})"
        for layer in layers
        for role, (key, tensor) in layer.tensors.items()
        if role == "A" and (tensor.ndim == 0 or tensor.shape[0] == 0)
    ]
    if empty:
        raise AdapterConfigError(
            f"adapter {path} has layers of rank 0: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}; a LoRA rank must be at least 1. The file is "
            f"damaged or was saved from an empty adapter"
        )


def _build_adapter(
    raw: _RawLayer,
    base_shape: tuple[int, ...],
    weight_name: str,
    module: str,
    index: _BaseIndex,
) -> tuple[LoraAdapter, str] | str:
    """The adapter and its layer kind, or what is wrong with it."""
    lora_A = raw.tensors["A"][1]
    lora_B = raw.tensors["B"][1]
    rank = int(lora_A.shape[0])
    if raw.expected_rank is not None and raw.expected_rank[0] != rank:
        return (
            f"rank {rank} in the file (lora_A shape {tuple(lora_A.shape)}) but "
            f"{raw.expected_rank[1]}; the config does not belong to these weights"
        )
    bias = raw.tensors.get("bias", (None, None))[1]
    magnitude = raw.tensors.get("magnitude", (None, None))[1]
    if bias is not None and not raw.allow_bias:
        return "has a lora_B.bias but the config says lora_bias=false"
    if magnitude is not None and not raw.allow_magnitude:
        return "has a lora_magnitude_vector but the config says use_dora=false"
    if magnitude is None and raw.require_magnitude:
        return "the config says use_dora=true but the layer has no lora_magnitude_vector"
    kind, fan_in_fan_out = _layer_kind(raw, lora_A, lora_B, base_shape)
    if kind is None:
        return _shape_mismatch(raw, lora_A, lora_B, base_shape, weight_name)
    if bias is not None and f"{module}.bias" not in index.names:
        if not bool((bias == 0).all()):
            return (
                f"has a lora_B.bias but base weight {weight_name!r} has no bias "
                f"({module + '.bias'!r}) to add it to"
            )
        bias = None  # an all-zero LoRA bias adds nothing: PEFT writes one for every layer
    try:
        adapter = LoraAdapter(
            lora_A,
            lora_B,
            raw.alpha,
            use_rslora=raw.use_rslora,
            lora_bias=bias,
            magnitude=magnitude,
            fan_in_fan_out=fan_in_fan_out,
        )
    except AdapterConfigError as error:
        return str(error)
    return adapter, kind


def _layer_kind(
    raw: _RawLayer, lora_A: torch.Tensor, lora_B: torch.Tensor, base_shape: tuple[int, ...]
) -> tuple[str | None, bool]:
    """``(kind, fan_in_fan_out)`` if the adapter fits the base weight's shape, else ``(None, False)``."""
    if lora_A.ndim < 2 or lora_B.ndim < 2:
        return None, False
    out_features, in_features = int(lora_B.shape[0]), int(lora_A.shape[1])
    if raw.embedding:
        fits = base_shape == (in_features, out_features)
        return ("embedding" if fits else None), False
    if lora_A.ndim > 2:
        kernel = tuple(int(size) for size in lora_A.shape[2:])
        fits = base_shape == (out_features, in_features, *kernel)
        return (f"conv{lora_A.ndim - 2}d" if fits else None), False
    stored_out_in = base_shape == (out_features, in_features)
    stored_in_out = base_shape == (in_features, out_features)
    if raw.fan_in_fan_out and stored_in_out:
        return "fan_in_fan_out", True
    if stored_out_in:
        # With fan_in_fan_out set, PEFT still treats an nn.Linear (out, in) as such.
        return "linear", False
    return None, False


def _shape_mismatch(
    raw: _RawLayer,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_shape: tuple[int, ...],
    weight_name: str,
) -> str:
    shapes = f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
    if lora_A.ndim < 2 or lora_B.ndim < 2:
        return f"shape mismatch: {shapes} are not matrices"
    out_features, in_features = int(lora_B.shape[0]), int(lora_A.shape[1])
    if raw.embedding:
        need = f"an embedding weight ({in_features}, {out_features})"
    elif lora_A.ndim > 2:
        kernel = tuple(int(size) for size in lora_A.shape[2:])
        need = f"a conv weight {(out_features, in_features, *kernel)}"
    elif raw.fan_in_fan_out:
        need = f"a weight ({in_features}, {out_features}) stored (in, out), or ({out_features}, {in_features})"
    else:
        need = f"a weight ({out_features}, {in_features})"
    hint = ""
    if not raw.embedding and lora_A.ndim == 2 and base_shape == (in_features, out_features):
        hint = (
            "; the base stores it as (in, out), GPT-2 Conv1D style: if so, set "
            "fan_in_fan_out=true in the adapter config"
        )
    return (
        f"shape mismatch: base weight {weight_name!r} is {base_shape} but the adapter "
        f"({shapes}) needs {need}{hint}"
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
