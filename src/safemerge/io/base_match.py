"""Matching adapter layers to a base model's weights, and checking that their shapes fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from safemerge.errors import AdapterConfigError
from safemerge.io.adapter_keys import RawLayer
from safemerge.io.checkpoint import Checkpoint
from safemerge.merge.adapter import LoraAdapter

# Where each part of a diffusion model that kohya's prefixes name lives in a combined base
# (diffusers pipeline components, or the original single-file layout).
_COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("unet.", "model.diffusion_model.", "diffusion_model."),
    "te1": ("text_encoder.", "conditioner.embedders.0.", "cond_stage_model."),
    "te2": ("text_encoder_2.", "conditioner.embedders.1."),
    "te3": ("text_encoder_3.",),
}
#: The pipeline folder each of kohya's model parts is (``lora_te2_*`` adapts ``text_encoder_2``).
KOHYA_COMPONENTS = {
    "unet": "unet",
    "te1": "text_encoder",
    "te2": "text_encoder_2",
    "te3": "text_encoder_3",
}


def base_shapes(
    base: Checkpoint | Mapping[str, torch.Tensor | Sequence[int]],
) -> dict[str, tuple[int, ...]]:
    """Weight name to shape, for a Checkpoint or a mapping of name to shape or tensor."""
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


class BaseIndex:
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
            self.flat_exact.setdefault(_flat(module), []).append(module)
            # Only suffixes starting at a '.': "q_proj" must not find "...k_q_proj".
            for i in range(1, len(pieces)):
                self.flat_by_suffix.setdefault(_flat(".".join(pieces[i:])), []).append(module)

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

    def resolve_flat(self, flat: str, component: str = "") -> list[str]:
        """Base modules whose name, with '.' read as '_', is ``flat``, or ends with it after
        a '.'; those under another model part than kohya's ``component`` left out."""
        candidates = self.flat_exact.get(flat) or self.flat_by_suffix.get(flat, [])
        if not candidates:
            candidates = self._flat_with_extra_prefix(flat)
        if not component or not candidates:
            return candidates
        own = _COMPONENT_PREFIXES.get(component, ())
        others = tuple(
            prefix
            for name, prefixes in _COMPONENT_PREFIXES.items()
            if name != component
            for prefix in prefixes
        )
        kept = [m for m in candidates if not m[: len(m) - len(flat)].startswith(others)]
        preferred = [m for m in kept if m[: len(m) - len(flat)].startswith(own)]
        return preferred if len(kept) > 1 and preferred else kept

    def _flat_with_extra_prefix(self, flat: str) -> list[str]:
        """The base modules ``flat`` names with a leading prefix the base lacks (its longest
        suffix found, cut at a '_'): ``text_model_encoder_layers_0_...`` is
        ``encoder.layers.0...`` of a CLIP text model that transformers saves unwrapped."""
        cuts = [i + 1 for i, char in enumerate(flat) if char == "_"]
        for cut in cuts:
            found = self.flat_exact.get(flat[cut:])
            if found:
                return found
        return []


class PipelineIndex:
    """A pipeline's weights, named ``"<component>.<weight>"``, each adapter layer looked up
    within the component its key names, as a :class:`BaseIndex` of that component alone
    (so a leading prefix one side has and the other lacks, such as CLIP's
    ``text_model.``, is resolved inside the component, never across components)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], components: Sequence[str]) -> None:
        self.names = set(shapes)
        self.parts = {
            component: BaseIndex(
                {
                    name.removeprefix(f"{component}."): shape
                    for name, shape in shapes.items()
                    if name.startswith(f"{component}.")
                }
            )
            for component in components
        }

    def resolve(self, module: str) -> list[str]:
        """``"unet.down_blocks.0...to_q"``: the module within the component it starts with."""
        component, _, inner = module.partition(".")
        if component not in self.parts:
            return []
        return [f"{component}.{found}" for found in self.parts[component].resolve(inner)]

    def resolve_flat(self, flat: str, component: str = "") -> list[str]:
        """A kohya name within the component its prefix names (``te1``: ``text_encoder``)."""
        folder = KOHYA_COMPONENTS.get(component, component)
        if folder not in self.parts:
            return []
        return [f"{folder}.{found}" for found in self.parts[folder].resolve_flat(flat)]


def _flat(module: str) -> str:
    return module.replace(".", "_")


def unmatched(raw: RawLayer) -> str:
    """What to say of a layer that matches no base weight."""
    if raw.flat:
        return (
            f"no base weight matches: no module name, with '.' read as '_', is (or ends "
            f"with) {raw.module!r}; is this adapter for another model (or another part of it)?"
        )
    return (
        f"no base weight matches: looked for {raw.module + '.weight'!r} (with or without a "
        f"leading prefix); is this adapter for another model?"
    )


def ambiguous(candidates: Sequence[str]) -> str:
    """What to say of a layer that matches several base weights."""
    shown = ", ".join(repr(f"{module}.weight") for module in candidates[:5])
    more = f" and {len(candidates) - 5} more" if len(candidates) > 5 else ""
    return (
        f"ambiguous: matches {len(candidates)} base weights ({shown}{more}); rename the "
        f"adapter's keys to the full module path"
    )


def build_adapter(
    raw: RawLayer,
    base_shape: tuple[int, ...],
    weight_name: str,
    module: str,
    index: BaseIndex | PipelineIndex,
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
    raw: RawLayer, lora_A: torch.Tensor, lora_B: torch.Tensor, base_shape: tuple[int, ...]
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
    raw: RawLayer,
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
