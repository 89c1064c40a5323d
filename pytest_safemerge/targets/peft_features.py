"""What the installed PEFT has: its LoRA layer kinds, adapter options and API shapes.

The PEFT contracts (:mod:`pytest_safemerge.targets.peft`) run against any PEFT release
from 0.10.0 on. Releases differ in what they can hold (``lora_bias`` came in 0.14.0,
``Conv3d`` layers in 0.14.0, DoRA on embeddings in 0.13.0, ...) and in how their layers are
built (keyword arguments, or a ``LoraConfig`` from 0.19.0). :func:`installed` reads both
from the installed PEFT by introspection: a class or a parameter is there or it is not.
DoRA on a layer kind is read from PEFT's DoRA layer classes (``peft.tuners.lora.dora``,
from 0.12.0); before that module existed DoRA lived inside ``LoraLayer``, for linear and
Conv2d layers only, which no class tells, hence :data:`_DORA_BEFORE_ITS_MODULE`.

:data:`FEATURES` says, for each capability, when PEFT added it: the release that lacks one
is named in the reason its cells are skipped, e.g. "PEFT 0.10.0 has no lora_bias (added in
0.14.0)".
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

__all__ = ["FEATURES", "Feature", "PeftFeatures", "installed", "read"]


@dataclass(frozen=True)
class Feature:
    """A capability some PEFT releases lack.

    Attributes:
        what: what a release lacking it has not, as the reason says it ("no lora_bias").
        added_in: the first PEFT release that has it.
    """

    what: str
    added_in: str

    def missing_in(self, version: str) -> str:
        """``"PEFT 0.10.0 has no lora_bias (added in 0.14.0)"``."""
        return f"PEFT {version} has {self.what} (added in {self.added_in})"


#: Each capability of the suite's tags (``layer_kinds``) that a PEFT release may lack, by
#: tag, or by ``"layer+option"`` for an option on one layer kind. From PEFT's history:
#: lora_bias (huggingface/peft#2237), Conv3d (#2082), Conv1d (#2333), DoRA on Embedding
#: (#2006), DoRA on Conv1d (#2531).
FEATURES: dict[str, Feature] = {
    "lora-bias": Feature("no lora_bias", "0.14.0"),
    "conv1d": Feature("no LoRA layer for Conv1d", "0.15.0"),
    "conv3d": Feature("no LoRA layer for Conv3d", "0.14.0"),
    "embedding+dora": Feature("no DoRA on Embedding", "0.13.0"),
    "conv1d+dora": Feature("no DoRA on Conv1d", "0.16.0"),
}

#: PEFT's DoRA layer class for each layer kind (a transposed weight is a ``lora.Linear``).
_DORA_CLASSES = {
    "linear": "DoraLinearLayer",
    "fan_in_fan_out": "DoraLinearLayer",
    "embedding": "DoraEmbeddingLayer",
    "conv1d": "DoraConv1dLayer",
    "conv2d": "DoraConv2dLayer",
    "conv3d": "DoraConv3dLayer",
}
#: Before ``peft.tuners.lora.dora`` (0.12.0), ``LoraLayer`` itself held DoRA, for these.
_DORA_BEFORE_ITS_MODULE = frozenset({"linear", "fan_in_fan_out", "conv2d"})
#: PEFT's LoRA layer class (in ``peft.tuners.lora.layer``) for each unquantized kind.
_LAYER_CLASSES = {
    "linear": "Linear",
    "fan_in_fan_out": "Linear",
    "embedding": "Embedding",
    "conv1d": "Conv1d",
    "conv2d": "Conv2d",
    "conv3d": "Conv3d",
}


@dataclass(frozen=True)
class PeftFeatures:
    """What one PEFT release has, read from its modules.

    Attributes:
        version: ``peft.__version__``.
        layer_kinds: the unquantized layer kinds it has a LoRA layer for (tags).
        dora_kinds: the layer kinds whose LoRA layer takes DoRA.
        lora_bias: whether ``LoraConfig`` has ``lora_bias`` (a bias on ``lora_B``).
        layers_take_config: whether its LoRA layers are built from a ``LoraConfig``
            (``config=``, 0.19.0, #2960) rather than from one keyword argument per setting.
        set_adapter_takes_inference_mode: whether ``set_adapter`` takes ``inference_mode``
            (0.18.0, #2765; before, an adapter set active is trainable, which a merge
            ignores).
    """

    version: str
    layer_kinds: frozenset[str]
    dora_kinds: frozenset[str]
    lora_bias: bool
    layers_take_config: bool
    set_adapter_takes_inference_mode: bool

    def has(self, key: str) -> bool:
        """Whether this release has the capability ``key`` of :data:`FEATURES`."""
        layer, _, option = key.partition("+")
        if option == "dora":
            return layer in self.dora_kinds
        if key == "lora-bias":
            return self.lora_bias
        return layer in self.layer_kinds

    def missing(self) -> dict[str, str]:
        """The capabilities of :data:`FEATURES` this release lacks, each with its reason
        (the ``unsupported`` declaration of an implementation built on this PEFT)."""
        return {
            key: feature.missing_in(self.version)
            for key, feature in FEATURES.items()
            if not self.has(key)
        }


def read(peft: ModuleType, lora_layer: ModuleType, dora: ModuleType | None) -> PeftFeatures:
    """The features of the PEFT whose ``peft``, ``peft.tuners.lora.layer`` and
    ``peft.tuners.lora.dora`` (None where it does not exist) modules these are."""
    layer_kinds = frozenset(
        kind for kind, name in _LAYER_CLASSES.items() if hasattr(lora_layer, name)
    )
    if dora is None:
        dora_kinds = _DORA_BEFORE_ITS_MODULE & layer_kinds
    else:
        dora_kinds = (
            frozenset(kind for kind, name in _DORA_CLASSES.items() if hasattr(dora, name))
            & layer_kinds
        )
    config_fields = {field.name for field in dataclasses.fields(peft.LoraConfig)}
    return PeftFeatures(
        version=str(peft.__version__),
        layer_kinds=layer_kinds,
        dora_kinds=dora_kinds,
        lora_bias="lora_bias" in config_fields,
        layers_take_config=_takes(lora_layer.Linear.__init__, "config"),
        set_adapter_takes_inference_mode=_takes(lora_layer.Linear.set_adapter, "inference_mode"),
    )


@cache
def installed() -> PeftFeatures:
    """The features of the installed PEFT (read once).

    Raises:
        ImportError: PEFT is not installed.
    """
    peft = importlib.import_module("peft")
    lora_layer = importlib.import_module("peft.tuners.lora.layer")
    try:
        dora: ModuleType | None = importlib.import_module("peft.tuners.lora.dora")
    except ImportError:  # before 0.12.0
        dora = None
    return read(peft, lora_layer, dora)


def _takes(function: Any, parameter: str) -> bool:
    return parameter in inspect.signature(function).parameters
