"""How each adapter format names its tensors: keys parsed into one raw layer per module.

PEFT (``lora_A``/``lora_B``, with the config's ranks, alphas and options applied), kohya
(``lora_unet_*.lora_down``/``lora_up``/``alpha``) and old diffusers (``lora.down``/``up``).
Keys that are no part of a LoRA pair are collected as problems, not skipped.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safemerge.errors import AdapterConfigError, AdapterFormatError

PEFT_PREFIX = "base_model.model."
#: The pipeline components diffusers' LoRA files prefix their PEFT keys with
#: (``"unet.down_blocks.0....to_q.lora_A.weight"``).
DIFFUSERS_COMPONENTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "decoder",
)
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
_KOHYA_KEY = re.compile(
    r"^lora_(?P<component>unet|te\d?)_(?P<flat>.+?)\.(?P<part>[^.]+(?:\.weight)?)$"
)
_KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
_DIFFUSERS_KEY = re.compile(
    r"^(?P<stem>.+?)(?P<sep>\.lora|\.lora_linear_layer|_lora)\.(?P<side>down|up)\.weight$"
)
_DIFFUSERS_ALPHAS_METADATA_KEY = "network_alphas"

_NOT_LORA = (
    "not a LoRA tensor (safemerge merges lora_A/lora_B pairs only; modules_to_save, "
    "trained biases, LoHa/LoKr and other adapter kinds are not supported)"
)


def detect_format(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """``"peft"``, ``"kohya"`` or ``"diffusers"``, from the keys.

    Raises:
        AdapterFormatError: no LoRA keys, or keys of several formats.
    """
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
class RawLayer:
    """One adapter layer as found in the file, before it is matched to the base."""

    module: str  # module path (kohya: the flattened name) as the base is searched for it
    label: str  # how messages name it: the file's key stem
    flat: bool = False
    embedding: bool = False
    # PEFT: the config section it takes its options from (diffusers metadata);
    # kohya: the model part its key names ("unet", "te1", "te2", "te3").
    component: str = ""
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
class ParsedKeys:
    """An adapter file's layers, and the keys that belong to none."""

    layers: list[RawLayer]
    problems: list[tuple[str, str]]


def _add_part(
    layers: dict[str, RawLayer],
    problems: list[tuple[str, str]],
    raw: RawLayer,
    role: str,
    key: str,
    tensor: torch.Tensor,
) -> RawLayer:
    layer = layers.setdefault(raw.label, raw)
    if role in layer.tensors:
        problems.append(
            (key, f"a second {role} for layer {raw.label!r} ({layer.tensors[role][0]!r})")
        )
    else:
        layer.tensors[role] = (key, tensor)
    return layer


def _pairs_complete(layers: Iterable[RawLayer], problems: list[tuple[str, str]]) -> list[RawLayer]:
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


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """Whether every key starts with a pipeline component (``"unet."``, ``"text_encoder."``...),
    as the LoRA files diffusers saves name them."""
    prefixes = tuple(f"{component}." for component in DIFFUSERS_COMPONENTS)
    listed = list(keys)
    return bool(listed) and all(key.startswith(prefixes) for key in listed)


def parse_peft(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> ParsedKeys:
    """PEFT keys (any ``base_model.model.`` prefix or adapter-name infix) into layers, config applied.

    ``config=None`` is a diffusers LoRA file saved without one: diffusers then loads
    every layer with ``lora_alpha = r`` (a scale of 1) and takes its options from the
    keys (a ``lora_B.bias``, a ``lora_magnitude_vector``), and so does this.
    """
    problems: list[tuple[str, str]] = []
    layers: dict[str, RawLayer] = {}
    adapter_names: dict[str, str] = {}
    components = _component_configs(config) if config is not None else {}
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
        layer = _add_part(layers, problems, RawLayer(module=module, label=stem), role, key, tensor)
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
        if options:
            _apply_peft_options(layer, options.get(layer.component) or next(iter(options.values())))
        # else: RawLayer's defaults are diffusers' (alpha = rank, options from the keys)
    return ParsedKeys(complete, problems)


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


def _apply_peft_options(layer: RawLayer, options: _PeftOptions) -> None:
    # A component's config names modules inside that component ("unet.x.q" is "x.q").
    module = layer.module.removeprefix(f"{layer.component}.") if layer.component else layer.module
    rank_key = pattern_key(options.rank_pattern, module)
    alpha_key = pattern_key(options.alpha_pattern, module)
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


def parse_kohya(tensors: Mapping[str, torch.Tensor]) -> ParsedKeys:
    """kohya keys (``lora_unet_*``, ``lora_te*_``) into layers named by their flattened path."""
    problems: list[tuple[str, str]] = []
    layers: dict[str, RawLayer] = {}
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
        component = {"te": "te1"}.get(match.group("component"), match.group("component"))
        raw = RawLayer(module=match.group("flat"), label=stem, flat=True, component=component)
        _add_part(layers, problems, raw, role, key, tensor)
    for stem, (key, _) in alphas.items():
        if stem not in layers:
            problems.append((key, "an alpha for a layer with no lora_down/lora_up in the file"))
    complete = _pairs_complete(layers.values(), problems)
    for layer in complete:
        if layer.label in alphas:
            layer.alpha = _scalar_alpha(*alphas[layer.label], problems)
        _kohya_defaults(layer)
    return ParsedKeys(complete, problems)


def _kohya_defaults(layer: RawLayer) -> None:
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


def parse_diffusers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> ParsedKeys:
    """Old diffusers keys (``lora.down``, ``_lora.down``, ``lora_linear_layer.down``) into layers."""
    problems: list[tuple[str, str]] = []
    layers: dict[str, RawLayer] = {}
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
            module = _processor_module(stem)
        role = "A" if match.group("side") == "down" else "B"
        raw = RawLayer(module=module, label=stem, aliases=(stem + match.group("sep"), module))
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
    return ParsedKeys(complete, problems)


# A text encoder's attention in diffusers' attention-processor form ("self_attn.to_q_lora")
# names transformers' projections (CLIP's "self_attn.q_proj"), as diffusers' loader maps them.
_TEXT_ENCODER_PROJECTIONS = {
    "self_attn.to_q": "self_attn.q_proj",
    "self_attn.to_k": "self_attn.k_proj",
    "self_attn.to_v": "self_attn.v_proj",
    "self_attn.to_out": "self_attn.out_proj",
}


def _processor_module(stem: str) -> str:
    """The module an attention processor's LoRA (``"attn1.processor.to_q_lora"``) adapts."""
    for processor, projection in _TEXT_ENCODER_PROJECTIONS.items():
        if stem.endswith("." + processor):
            return stem.removesuffix(processor) + projection
    module = stem.replace(".processor.", ".")
    # diffusers' Attention keeps its output projection as to_out = [Linear, Dropout]
    return module + ".0" if module.endswith("to_out") else module


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


def refuse_zero_rank(path: Path, layers: Iterable[RawLayer]) -> None:
    """Raise AdapterConfigError naming every layer whose lora_A has rank 0."""
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
