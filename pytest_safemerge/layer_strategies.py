"""Hypothesis strategies for the module-level ("layer") contract: whole layers with adapters.

A :class:`LayerCase` is a pristine layer (Linear, Embedding, Conv1d/2d/3d, a layer storing
its weight ``(in, out)``, or a real bitsandbytes Linear4bit / Linear8bitLt), the adapters
to fuse into it, a scale, and what the case is about. Cases carry tags, so that an
implementation can say which it supports (``layer_kinds``):

- layer kinds (:data:`LAYER_TAGS`): ``"linear"``, ``"embedding"``, ``"conv1d"``,
  ``"conv2d"``, ``"conv3d"``, ``"fan_in_fan_out"``, ``"nf4"``, ``"fp4"``, ``"int8"``;
- options (:data:`OPTION_TAGS`): ``"lora-bias"`` (layers with a bias, not embeddings),
  ``"dora"`` (unquantized layers, a single adapter, no lora_bias, as in PEFT),
  ``"several"`` (2 or 3 adapters with their own ranks and alphas, some rsLoRA).

Kinds of case (:data:`LAYER_CASE_KINDS`): ``"random"`` (an ordinary, finite merge), and
the ones every correct implementation refuses: ``"nan"``, ``"+inf"``, ``"-inf"`` planted
anywhere in lora_A, lora_B, lora_bias or the DoRA magnitude (at any scale, 0 included);
``"cast-overflow"``: the weight's float32 sum is beyond the range of the dtype it is
stored in (float16 for an int8 layer, whose Int8Params quantize through float16; float32
itself for float32 and 4-bit layers); ``"bias-overflow"``: the same for the bias.

Dtypes: an unquantized layer's weight is float32, float16 or bfloat16 (``dtype=`` picks
one: a cell of the suite); every adapter's tensors are float32, float16 or bfloat16
(``adapter_dtype=``), holding the values the expected results are computed from. 4-bit
layers are either narrower than a block (blocks straddle rows) or rows of 1 to 4 whole
blocks, as real layers are (:func:`rows_are_whole_blocks`).

Like :mod:`pytest_safemerge.strategies`, the bulk of every tensor comes from a drawn seed,
and what a property hinges on (sizes, dtype, options, ranks, scales, where a NaN is
planted) is drawn by Hypothesis, so that a failure shrinks to a small, readable case.

This module is the public front: it only re-exports. The builders live in the private
package :mod:`pytest_safemerge._strategies`, next to those of
:mod:`pytest_safemerge.strategies` (whose seeds, seeded tensors, rounding and argument
checks they share): ``layer_kinds`` (tags, kinds of case, dtypes, which fit a layer
kind), ``layer_case`` (:class:`LayerCase`), ``layer_shapes`` (layers, 4-bit shapes),
``layer_adapters`` (their adapters), ``layer_adversarial`` (NaN/Inf planting, cast and
bias overflow) and ``layer_cases`` (:func:`layer_cases`, its argument checks).
"""

from __future__ import annotations

from pytest_safemerge._strategies.layer_case import LayerCase
from pytest_safemerge._strategies.layer_cases import layer_cases
from pytest_safemerge._strategies.layer_kinds import (
    ADAPTER_DTYPES,
    ALL_TAGS,
    LAYER_CASE_KINDS,
    LAYER_DTYPES,
    LAYER_TAGS,
    OPTION_TAGS,
    QUANTIZED_TAGS,
    REFUSED_LAYER_KINDS,
    UNQUANTIZED_TAGS,
    kinds_for,
    options_for,
)
from pytest_safemerge._strategies.layer_shapes import rows_are_whole_blocks

__all__ = [
    "ADAPTER_DTYPES",
    "ALL_TAGS",
    "LAYER_CASE_KINDS",
    "LAYER_DTYPES",
    "LAYER_TAGS",
    "OPTION_TAGS",
    "QUANTIZED_TAGS",
    "REFUSED_LAYER_KINDS",
    "UNQUANTIZED_TAGS",
    "LayerCase",
    "kinds_for",
    "layer_cases",
    "options_for",
    "rows_are_whole_blocks",
]
