"""The PEFT tuners that merge, found in the installed PEFT by introspection.

A tuner is in the contract when PEFT maps its type to a config and a tuner model
(``PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING``), its config targets
modules (``target_modules``), and its package defines a tuner layer class whose ``merge``
is its own (not :class:`BaseTunerLayer`'s). A new release's tuners are picked up that
way, with no change here; LoRA is left to the LoRA contracts. :data:`KNOWN_TUNERS` names
the tuners the contract is about on any release, so a cell exists (and is skipped, naming
the release) where the installed PEFT lacks one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

#: The tuners whose cells exist on every release (skipped where the release lacks them).
KNOWN_TUNERS = ("boft", "fourierft", "glora", "hra", "ia3", "loha", "lokr", "oft", "vera")
#: Tuners another contract covers.
NOT_HERE = frozenset({"lora"})


@dataclass(frozen=True)
class Tuner:
    """One PEFT tuner that merges.

    Attributes:
        name: the PEFT type in lower case (``"loha"``), the cell's name.
        peft_type: PEFT's name for it (``"LOHA"``).
        config_class: its config (``LoHaConfig``).
        layer_classes: its tuner layer classes that define ``merge``.
    """

    name: str
    peft_type: str
    config_class: type
    layer_classes: tuple[type, ...]

    @property
    def config_fields(self) -> frozenset[str]:
        return frozenset(field.name for field in dataclasses.fields(self.config_class))


def peft_version() -> str:
    """The installed PEFT's version, or ``"not installed"``."""
    try:
        import peft
    except ImportError:
        return "not installed"
    return str(peft.__version__)


@functools.cache
def installed_tuners() -> dict[str, Tuner]:
    """Every tuner of the installed PEFT that merges, by name (empty without PEFT)."""
    try:
        from peft import mapping
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    configs = getattr(mapping, "PEFT_TYPE_TO_CONFIG_MAPPING", {})
    models = getattr(mapping, "PEFT_TYPE_TO_TUNER_MAPPING", {})
    found: dict[str, Tuner] = {}
    for peft_type, model_class in models.items():
        type_name = str(getattr(peft_type, "value", peft_type))
        name = type_name.lower()
        config_class = configs.get(peft_type)
        if name in NOT_HERE or config_class is None or not dataclasses.is_dataclass(config_class):
            continue
        if "target_modules" not in {field.name for field in dataclasses.fields(config_class)}:
            continue
        package = _package_of(model_class)
        if package is None:
            continue
        layers = _merging_layer_classes(package, BaseTunerLayer)
        if layers:
            found[name] = Tuner(name, type_name, cast(type, config_class), layers)
    return dict(sorted(found.items()))


def tuner_names() -> tuple[str, ...]:
    """The cells' tuners: the known ones and every one the installed PEFT adds."""
    return tuple(sorted({*KNOWN_TUNERS, *installed_tuners()}))


def missing_reason(name: str) -> str | None:
    """Why ``name``'s cells are skipped on the installed PEFT, or None when it is there."""
    if name in installed_tuners():
        return None
    return f"PEFT {peft_version()} has no {name.upper()} tuner that merges"


@functools.cache
def merge_refusal(name: str) -> str | None:
    """Why the installed ``name``'s layers never merge, when each one's ``merge`` raises
    NotImplementedError before it reads the layer (ShadowPEFT, Lily: an input-dependent
    adaptation, no weight delta); None when some layer may merge.

    Each merge is called on a bare object (no state; not an instance, whose finalizer
    would run on state it lacks): a merge that does anything first fails on the missing
    state with another error, and counts as one that merges."""
    tuner = installed_tuners().get(name)
    if tuner is None:
        return None
    said = []
    for layer_class in tuner.layer_classes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cast(Any, layer_class).merge(_Bare())
        except NotImplementedError as error:
            said.append(str(error).strip() or layer_class.__qualname__)
        except Exception:
            return None
        else:
            return None
    return f"PEFT {peft_version()}'s {tuner.peft_type} does not merge: {said[0]}"


class _Bare:
    """An object with no state, for :func:`merge_refusal`."""


def _package_of(model_class: type) -> ModuleType | None:
    """The package of a tuner model class (``peft.tuners.loha`` for LoHaModel)."""
    parts = model_class.__module__.split(".")
    if len(parts) < 3 or parts[:2] != ["peft", "tuners"]:
        return None
    try:
        return importlib.import_module(".".join(parts[:3]))
    except ImportError:
        return None


def _merging_layer_classes(package: ModuleType, base: type) -> tuple[type, ...]:
    """The tuner layer classes defined in ``package`` (or its modules) whose ``merge`` is
    not ``base``'s; a module that cannot be imported (an optional backend) is passed by."""
    modules: list[ModuleType] = [package]
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        try:
            modules.append(importlib.import_module(f"{package.__name__}.{info.name}"))
        except Exception:
            continue
    found: dict[str, type] = {}
    for module in modules:
        for value in vars(module).values():
            if not (inspect.isclass(value) and issubclass(value, base)):
                continue
            if not value.__module__.startswith(package.__name__):
                continue
            if _defines_merge(value, base):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return tuple(found[key] for key in sorted(found))


def _defines_merge(cls: type, base: type) -> bool:
    merge: Any = getattr(cls, "merge", None)
    return merge is not None and merge is not getattr(base, "merge", None)
