"""Randomized LoRA configs on tiny models, and the PEFT model each one builds.

A :class:`ModelCase` is drawn by Hypothesis: the layer kind and dtype of its cell, one to
three adapters, each with its own rank and an alpha that is not its rank, and any of
rsLoRA, lora_bias, DoRA, a ``rank_pattern`` and an ``alpha_pattern`` the installed PEFT
supports on the kind. Adapters are injected by PEFT itself (``get_peft_model``, then
``add_adapter``), then every adapter tensor is overwritten with seeded random values:
PEFT initialises ``lora_B`` to zero and DoRA's magnitude to the weight's norm, and a zero
delta or an untrained magnitude proves nothing.

DoRA adapters are drawn alone: with several DoRA adapters active, PEFT's forward
rescales each adapter's input by what the adapters before it added, an order-dependent
result that no single merged weight is defined to reproduce.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import assume
from hypothesis import strategies as st

from pytest_safemerge.peft_suite import features
from pytest_safemerge.peft_suite.models import KINDS, TinyModel, inputs_for

__all__ = ["AdapterSpec", "ModelCase", "model_cases"]

#: The modules every tiny model targets, in the order PEFT reaches them.
TARGETS = ("first", "layer")


#: Models built lately, by what defines them (the oldest dropped first).
_BUILT: dict[tuple[Any, ...], Any] = {}
_BUILT_KEPT = 16


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's config: what the oracle reads, independently of PEFT."""

    name: str
    r: int
    alpha: float
    options: frozenset[str] = frozenset()
    pattern_r: int = 0  # the rank rank_pattern gives ``layer`` (0: none)
    pattern_alpha: float = 0.0  # the alpha alpha_pattern gives ``layer`` (0: none)

    def rank(self, module: str) -> int:
        return self.pattern_r if module == "layer" and self.pattern_r else self.r

    def alpha_of(self, module: str) -> float:
        return self.pattern_alpha if module == "layer" and self.pattern_alpha else self.alpha

    def lora_config(self) -> Any:
        from peft import LoraConfig

        settings: dict[str, Any] = {
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": list(TARGETS),
            "lora_dropout": 0.0,
        }
        for option, config_field in features.OPTIONS.items():
            if option not in self.options:
                continue
            if option == "rank_pattern":
                settings[config_field] = {"layer": self.pattern_r}
            elif option == "alpha_pattern":
                settings[config_field] = {"layer": self.pattern_alpha}
            else:
                settings[config_field] = True
        return LoraConfig(**settings)


@dataclass
class ModelCase:
    """A tiny model of one layer kind and dtype, its adapters, and seeds for their values."""

    kind: str
    dtype: torch.dtype
    adapters: tuple[AdapterSpec, ...]
    seed: int
    spread: float  # adapter values are normal with this standard deviation
    planted: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> frozenset[str]:
        found = {option for adapter in self.adapters for option in adapter.options}
        if len(self.adapters) > 1:
            found.add("several")
        return frozenset(found)

    def describe(self) -> str:
        adapters = "; ".join(
            f"{a.name}: r={a.r} alpha={a.alpha:g}"
            + (f" layer r={a.pattern_r}" if a.pattern_r else "")
            + (f" layer alpha={a.pattern_alpha:g}" if a.pattern_alpha else "")
            + (f" {sorted(a.options)}" if a.options else "")
            for a in self.adapters
        )
        return (
            f"{self.kind} model, {self.dtype}, seed {self.seed}, spread {self.spread:g}: {adapters}"
        )

    def build(self) -> Any:
        """The PEFT model: ``TinyModel`` in ``dtype`` with every adapter injected by PEFT,
        all adapters active, their tensors random. A fresh copy each call (the checks
        write into it) of a model built once per case: Hypothesis re-runs a case's model
        while it varies what is planted in it, and copying costs half of building."""
        key = (self.kind, self.dtype, self.adapters, self.seed, self.spread)
        pristine = _BUILT.pop(key, None)
        if pristine is None:
            pristine = self._build()
        _BUILT[key] = pristine  # most recently used last
        while len(_BUILT) > _BUILT_KEPT:
            del _BUILT[next(iter(_BUILT))]
        return copy.deepcopy(pristine)

    def _build(self) -> Any:
        from peft import get_peft_model

        torch.manual_seed(self.seed)
        model = TinyModel(KINDS[self.kind]).to(self.dtype)
        first, *others = self.adapters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, first.lora_config(), adapter_name=first.name)
            for adapter in others:
                peft_model.add_adapter(adapter.name, adapter.lora_config())
            peft_model.base_model.set_adapter([adapter.name for adapter in self.adapters])
        randomize(peft_model, torch.Generator().manual_seed(self.seed), self.spread)
        peft_model.eval()
        return peft_model

    def inputs(self) -> dict[str, torch.Tensor]:
        return inputs_for(
            KINDS[self.kind], self.dtype, torch.Generator().manual_seed(self.seed + 1)
        )


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """Every LoRA layer of the model by its module name (``first``, ``layer``, and
    ``layer.base_layer.out_proj`` inside a MultiheadAttention)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def adapter_tensors(layer: Any, name: str) -> dict[str, Any]:
    """The adapter's parameters on one LoRA layer: ``A``, ``B``, and ``bias`` and
    ``magnitude`` where it has them (absent keys: the adapter does not touch them)."""
    found: dict[str, Any] = {}
    if name in getattr(layer, "lora_embedding_A", {}):
        found["A"], found["B"] = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    elif name in layer.lora_A:
        found["A"], found["B"] = layer.lora_A[name].weight, layer.lora_B[name].weight
        # A MultiheadAttention's in_proj gets a lora bias with lora_bias=True, but PEFT
        # applies it nowhere (not in merge, not in the forward, so training leaves it at its
        # initial zero): it is not part of the adapter, and stays zero.
        in_proj = isinstance(layer.get_base_layer(), torch.nn.MultiheadAttention)
        if getattr(layer.lora_B[name], "bias", None) is not None and not in_proj:
            found["bias"] = layer.lora_B[name].bias
    magnitudes = getattr(layer, "lora_magnitude_vector", None) or {}
    if name in magnitudes:
        magnitude = magnitudes[name]
        found["magnitude"] = getattr(magnitude, "weight", magnitude)
    return found


def randomize(peft_model: Any, generator: torch.Generator, spread: float) -> None:
    """Overwrite every adapter tensor with random values: normal ``A``, ``B`` and bias,
    and a magnitude perturbed from PEFT's initial norm (a trained one)."""
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            for name in sorted(layer.lora_A.keys() | getattr(layer, "lora_embedding_A", {}).keys()):
                for key, tensor in sorted(adapter_tensors(layer, name).items()):
                    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
                    if key == "magnitude":
                        values = tensor.double() * (1 + 0.5 * noise.clamp(-1, 1))
                    else:
                        values = spread * noise
                    tensor.copy_(values.to(tensor.dtype))


def copy_model(peft_model: Any) -> Any:
    return copy.deepcopy(peft_model)


# --- strategies ---------------------------------------------------------------------------------


def _usable_options(kind: str) -> list[str]:
    return [o for o in features.OPTIONS if features.option_unsupported(kind, o) is None]


@st.composite
def _adapter(
    draw: st.DrawFn,
    name: str,
    kind: str,
    options: list[str],
    required: frozenset[str] = frozenset(),
) -> AdapterSpec:
    chosen = required | frozenset(o for o in options if draw(st.booleans()))
    # Rank 2 first (Hypothesis starts from, and shrinks towards, the first value): at rank
    # 1, r and sqrt(r) agree, and a scale of the wrong form would pass the simplest case.
    r = draw(st.sampled_from([2, 1, 3, 4]))
    # alpha is never the rank (scale 1 would hide a missing or doubled scaling).
    alpha = draw(st.sampled_from([0.5, 1.5, 3.0, 7.0, 16.0]).filter(lambda a: a != r))
    pattern_r = draw(st.integers(1, 4).filter(lambda x: x != r)) if "rank_pattern" in chosen else 0
    pattern_alpha = draw(st.sampled_from([2.5, 5.0, 11.0])) if "alpha_pattern" in chosen else 0.0
    return AdapterSpec(name, r, alpha, chosen, pattern_r, pattern_alpha)


@st.composite
def model_cases(
    draw: st.DrawFn,
    kind: str,
    dtype: torch.dtype,
    *,
    least_adapters: int = 1,
    dora: bool = True,
    same_rank: bool = False,
    required: str | None = None,
    excluded: frozenset[str] = frozenset(),
) -> ModelCase:
    """Tiny models of ``kind`` in ``dtype`` with ``least_adapters`` to 3 adapters, drawing
    every option the installed PEFT supports on the kind (DoRA only alone, and not at all
    when ``dora`` is False; one rank for all when ``same_rank``), none of ``excluded``,
    and ``required`` always on the first adapter (the option must be supported)."""
    options = [o for o in _usable_options(kind) if (dora or o != "dora") and o not in excluded]
    count = 1 if required == "dora" else draw(st.integers(least_adapters, 3))
    if count > 1:
        options = [o for o in options if o != "dora"]
    if same_rank:
        options = [o for o in options if o != "rank_pattern"]
    must = frozenset({required} if required else ())
    adapters = [
        draw(_adapter(f"adapter_{i}", kind, options, must if i == 0 else frozenset()))
        for i in range(count)
    ]
    if same_rank:
        adapters = [
            AdapterSpec(a.name, adapters[0].r, a.alpha, a.options, 0, a.pattern_alpha)
            for a in adapters
        ]
    for adapter in adapters:
        try:
            adapter.lora_config()
        except ValueError:  # a combination PEFT's LoraConfig refuses (e.g. DoRA and lora_bias)
            assume(False)
    return ModelCase(
        kind=kind,
        dtype=dtype,
        adapters=tuple(adapters),
        seed=draw(st.integers(0, 2**31 - 1)),
        spread=draw(st.sampled_from([0.05, 0.5, 3.0])),
    )
