"""The names of the layer contract: layer kinds and options (tags), kinds of case, dtypes,
and which options and kinds of case fit a layer kind (see
:mod:`pytest_safemerge.layer_strategies`, which re-exports them)."""

from __future__ import annotations

from collections.abc import Collection

import torch

from pytest_safemerge._strategies import values
from safemerge import names

UNQUANTIZED_TAGS: tuple[str, ...] = names.UNQUANTIZED_KINDS
QUANTIZED_TAGS: tuple[str, ...] = names.QUANT_TYPES
LAYER_TAGS: tuple[str, ...] = names.LAYER_KINDS
OPTION_TAGS: tuple[str, ...] = names.OPTION_TAGS
ALL_TAGS: frozenset[str] = names.ALL_TAGS

REFUSED_LAYER_KINDS: tuple[str, ...] = ("nan", "+inf", "-inf", "cast-overflow", "bias-overflow")
LAYER_CASE_KINDS: tuple[str, ...] = ("random", *REFUSED_LAYER_KINDS)

#: Weight dtypes of the unquantized layer kinds (``layer_cases(dtype=...)``).
LAYER_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Dtypes of an adapter's tensors (``layer_cases(adapter_dtype=...)``).
ADAPTER_DTYPES: tuple[torch.dtype, ...] = values.ADAPTER_DTYPES


def options_for(layer: str) -> frozenset[str]:
    """The option tags a layer kind can carry (see :mod:`pytest_safemerge.layer_strategies`)."""
    options = {"several"}
    if layer != "embedding":
        options.add("lora-bias")
    if layer not in QUANTIZED_TAGS:
        options.add("dora")
    return frozenset(options)


def kinds_for(layer: str, allowed: Collection[str] = ALL_TAGS) -> tuple[str, ...]:
    """The case kinds :func:`layer_cases` can make for ``layer`` with these tags allowed."""
    kinds = ["random", "nan", "+inf", "-inf", "cast-overflow"]
    if "lora-bias" in options_for(layer) and "lora-bias" in allowed:
        kinds.append("bias-overflow")
    return tuple(kinds)
