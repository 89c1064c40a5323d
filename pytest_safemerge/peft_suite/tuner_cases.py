"""One case of the tuner contract: a tiny layer of one kind and dtype, with a tuner's
adapter injected by PEFT and set to random nonzero values.

The layer kinds (:data:`LAYER_KINDS`) are built small and non-square (16 inputs, 8
outputs: a transposed delta cannot pass for the right one). PEFT injects the adapter
(``get_peft_model``, which also serves the tuners whose state lives on the tuner model);
its adapters are kept in float32 beside a half-precision weight, as PEFT does by default.
Most tuners initialise their adapter to the identity (a zero delta proves nothing), so
every trainable parameter of the adapter is then overwritten with random values from the
case's seed.

Building a case (``get_peft_model``, the random values) costs more than most checks, and
a cell's runs and the five properties draw the same configs (Hypothesis tries the
simplest first): each distinct case is built once (:func:`build_case` keeps the pristine
case, bounded) and every check gets its own deep copy, with the pristine case's float64
maps, read once (:attr:`TunerCase.maps`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from pytest_safemerge.peft_suite import tuner_configs
from pytest_safemerge.peft_suite.tuners import Tuner

ADAPTER = "default"
IN_FEATURES = 16
OUT_FEATURES = 8
TARGET = "target"


def _gpt2_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return cast(nn.Module, Conv1D(OUT_FEATURES, IN_FEATURES))  # type: ignore[no-untyped-call]


#: The layer kinds, each built with 16 inputs (fan-in) and 8 outputs.
LAYER_KINDS: Mapping[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(IN_FEATURES, OUT_FEATURES),
    "conv1d": lambda: nn.Conv1d(IN_FEATURES // 2, OUT_FEATURES, kernel_size=2),
    "conv2d": lambda: nn.Conv2d(IN_FEATURES // 4, OUT_FEATURES, kernel_size=2),
    "embedding": lambda: nn.Embedding(IN_FEATURES, OUT_FEATURES),
    "gpt2_conv1d": _gpt2_conv1d,
}
#: Config fields a layer kind needs (GPT-2's Conv1D stores its weight transposed).
KIND_FIELDS: Mapping[str, Mapping[str, Any]] = {"gpt2_conv1d": {"fan_in_fan_out": True}}


class InjectionRefused(Exception):
    """PEFT does not inject this tuner, with these options, into this layer kind."""


@dataclass
class TunerCase:
    """A PEFT tuner layer with a random adapter, and how it was made."""

    tuner: str
    kind: str
    dtype: torch.dtype
    options: dict[str, Any]
    seed: int
    layer: Any = field(repr=False)  # a PEFT BaseTunerLayer (peft is untyped)
    #: The PEFT model that holds the layer (a tuner may keep shared state there).
    holder: nn.Module = field(repr=False)
    #: Maps read from the pristine case (``"base"``, ``"unmerged"``), shared by its fresh
    #: copies: valid only until a check changes the layer (see :meth:`fresh`).
    maps: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.tuner} on a {self.kind} layer ({str(self.dtype).removeprefix('torch.')})"

    def describe(self) -> str:
        return f"{self.name}, {tuner_configs.describe(self.options)}, seed {self.seed}"

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapter's trainable parameters, by name (``hada_w1_a.default``): a constant
        PEFT keeps as a frozen parameter (AdaLoRA's ``ranknum``) is not one."""
        return {n: p for n, p in adapter_parameters(self.layer).items() if p.requires_grad}

    def copy(self) -> TunerCase:
        """A deep copy to change (plant a value in): it reads its own maps."""
        return dataclasses.replace(self.fresh(), maps={})

    def fresh(self) -> TunerCase:
        """A deep copy of this pristine case, sharing its maps (the same values, bit for
        bit); a tuner whose state cannot be deep-copied is built again."""
        try:
            holder = copy.deepcopy(self.holder)
        except RuntimeError:  # a computed tensor kept as an attribute (DEFT; trainable
            # tokens on PEFT 0.20): built again, the same values from the same seed
            return _build(self.tuner, self.kind, self.dtype, _key(self.options), self.seed)
        return dataclasses.replace(self, holder=holder, layer=find_tuner_layer(holder))


def adapter_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``layer``'s adapter: outside the base layer, named by adapter."""
    return {
        name: parameter
        for name, parameter in layer.named_parameters()
        if not name.startswith("base_layer.") and ADAPTER in name.split(".")
    }


def find_tuner_layer(model: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return module
    raise InjectionRefused("PEFT injected no tuner layer")


def build_case(
    tuner: Tuner, kind: str, dtype: torch.dtype, options: Mapping[str, Any], seed: int
) -> TunerCase:
    """``tuner`` injected with ``options`` into a ``kind`` layer of ``dtype``, its adapter
    randomized from ``seed``: a fresh copy of the case built once (or of PEFT's refusal,
    :class:`InjectionRefused`, raised again)."""
    built = _pristine(tuner, kind, dtype, _key(options), seed)
    if isinstance(built, InjectionRefused):
        raise InjectionRefused(*built.args)
    return built.fresh()


def _key(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


#: Pristine cases kept: a cell's runs, and the properties' cells of one tuner and dtype
#: (collected next to each other), draw from a few dozen.
_KEPT = 256


@functools.lru_cache(maxsize=_KEPT)
def _pristine(
    tuner: Tuner, kind: str, dtype: torch.dtype, options: tuple[tuple[str, Any], ...], seed: int
) -> TunerCase | InjectionRefused:
    try:
        return _build(tuner, kind, dtype, options, seed)
    except InjectionRefused as refused:
        return refused


def _build(
    tuner: Tuner | str,
    kind: str,
    dtype: torch.dtype,
    options: tuple[tuple[str, Any], ...],
    seed: int,
) -> TunerCase:
    """Inject ``tuner`` with ``options`` into a new ``kind`` layer of ``dtype``, then
    randomize its adapter; :class:`InjectionRefused` when PEFT will not."""
    from peft import get_peft_model

    from pytest_safemerge.peft_suite.tuners import installed_tuners

    if isinstance(tuner, str):
        tuner = installed_tuners()[tuner]
    generator = torch.Generator().manual_seed(seed)
    base = LAYER_KINDS[kind]()
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model = nn.Sequential()
    model.add_module(TARGET, base.to(dtype))
    try:
        config = tuner_configs.build_config(tuner, dict(options), TARGET, KIND_FIELDS.get(kind, {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holder = get_peft_model(model, config)
    except (
        ValueError,
        TypeError,
        NotImplementedError,
        RuntimeError,
        AssertionError,
        AttributeError,
        KeyError,
        ImportError,  # an optional dependency missing (AdaMSS needs scikit-learn)
    ) as error:  # how PEFT's tuners say "not this layer"
        raise InjectionRefused(f"{type(error).__name__}: {error}") from error
    layer = find_tuner_layer(holder)
    randomize(layer, generator)
    holder.eval()
    return TunerCase(tuner.name, kind, dtype, dict(options), seed, layer, holder)


def randomize(layer: nn.Module, generator: torch.Generator) -> None:
    """Every trainable adapter parameter to random nonzero values: normal, at a scale
    drawn per parameter (0.05 to 1), nudged off zero. A frozen one is PEFT's constant
    (AdaLoRA's rank count) and keeps its value."""
    with torch.no_grad():
        for parameter in adapter_parameters(layer).values():
            if not parameter.requires_grad:
                continue
            scale = 0.05 + 0.95 * torch.rand((), generator=generator, dtype=torch.float64)
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            values = torch.where(values.abs() < 1e-3, torch.full_like(values, 1e-3), values)
            parameter.copy_((values * scale).to(parameter.dtype))
