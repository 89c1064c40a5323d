"""What the installed PEFT offers the model contract, found by introspection and probing.

A cell a release cannot run is skipped with a reason naming the release and what it
lacks, never crashes. Two ways to find out:

- introspection: ``LoraConfig``'s fields (``lora_bias``, ``use_dora``, ``rank_pattern``
  ...), the model's entry points, and the combination types ``add_weighted_adapter``
  documents;
- probing: a tiny model of the layer kind gets one adapter with the option on; if PEFT
  refuses it (``ValueError``, ``TypeError``, ``NotImplementedError``, ``KeyError``), the
  option is not supported there (no DoRA on a convolution, no ``nn.MultiheadAttention``
  before its release), and PEFT's own words are the reason.

A probe that *crashes* (any other exception, e.g. a ``RuntimeError`` on mismatched
shapes: PEFT 0.10.0's DoRA on GPT-2's ``Conv1D``) is not a refusal: the option is left
out of the generated cases like an unsupported one (so it cannot spoil the other
options' cases), but the cells of that kind fail with the crash (:func:`kind_crash`,
:func:`option_crash`): a crash is PEFT's bug, not a missing feature.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from functools import cache

import torch

from pytest_safemerge.peft_suite.models import KINDS, TinyModel

__all__ = [
    "ENTRY_POINTS",
    "OPTIONS",
    "combination_types",
    "entry_point_missing",
    "kind_crash",
    "kind_unsupported",
    "option_crash",
    "option_unsupported",
    "peft_version",
]

#: Each config option the contract draws, and the LoraConfig field it needs.
OPTIONS = {
    "rslora": "use_rslora",
    "lora_bias": "lora_bias",
    "dora": "use_dora",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
}
#: The model-level entry points, each on PEFT's LoraModel.
ENTRY_POINTS = (
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "delete_adapter",
    "add_weighted_adapter",
)


#: How much of PEFT's refusal a skip reason quotes.
_SHOWN = 200


@cache
def peft_version() -> str:
    import peft

    return str(peft.__version__)


@cache
def _config_fields() -> frozenset[str]:
    from peft import LoraConfig

    return frozenset(field.name for field in dataclasses.fields(LoraConfig))


def entry_point_missing(name: str) -> str | None:
    """Why the model contract cannot call ``name`` on this PEFT, or None."""
    from peft.tuners.lora import LoraModel

    if callable(getattr(LoraModel, name, None)):
        return None
    return f"PEFT {peft_version()} has no LoraModel.{name}"


@cache
def combination_types() -> tuple[str, ...]:
    """The combination types ``add_weighted_adapter`` documents (its docstring lists them:
    ``The merging type can be one of [`svd`, `linear`, ...]``)."""
    from peft.tuners.lora import LoraModel

    doc = LoraModel.add_weighted_adapter.__doc__ or ""
    listed = re.search(r"can be one of \[([^\]]*)\]", doc)
    if listed is None:
        return ("svd", "linear", "cat")
    return tuple(dict.fromkeys(re.findall(r"`(\w+)`", listed.group(1))))


@cache
def kind_unsupported(kind: str) -> str | None:
    """Why this PEFT cannot put LoRA on the layer kind (a refusal or a crash), or None."""
    return _probe(kind, "")[0]


def kind_crash(kind: str) -> str | None:
    """The crash putting LoRA on the layer kind, or None (a refusal is not a crash)."""
    reason, crashed = _probe(kind, "")
    return reason if crashed else None


@cache
def option_unsupported(kind: str, option: str) -> str | None:
    """Why this PEFT cannot put an adapter with ``option`` on the layer kind (a refusal or
    a crash), or None."""
    field = OPTIONS[option]
    if field not in _config_fields():
        return f"PEFT {peft_version()}'s LoraConfig has no {field}"
    return _probe(kind, option)[0]


def option_crash(kind: str, option: str) -> str | None:
    """The crash putting an adapter with ``option`` on the layer kind, or None."""
    if OPTIONS[option] not in _config_fields():
        return None
    reason, crashed = _probe(kind, option)
    return reason if crashed else None


#: What PEFT raises to refuse a layer kind or option it does not support.
_REFUSALS = (ValueError, TypeError, NotImplementedError, KeyError)


@cache
def _probe(kind: str, option: str) -> tuple[str | None, bool]:
    """Inject one adapter with ``option`` into a tiny model of ``kind``: None if PEFT takes
    it, else the reason and whether PEFT crashed rather than refused."""
    from peft import LoraConfig, get_peft_model

    settings: dict[str, object] = {"r": 2, "lora_alpha": 3, "target_modules": ["first", "layer"]}
    if option:
        settings[OPTIONS[option]] = {"layer": 1} if option.endswith("pattern") else True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            get_peft_model(TinyModel(KINDS[kind]), LoraConfig(**settings))  # type: ignore[arg-type]
    except Exception as error:
        what = f"{option} on {kind}" if option else kind
        words = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, _REFUSALS):
            return f"PEFT {peft_version()} refuses {what}: {words[:_SHOWN]}", False
        crash = f"{type(error).__name__}: {words[:_SHOWN]}"
        return f"PEFT {peft_version()} crashes injecting {what}: {crash}", True
    return None, False
