"""Hypothesis strategies for testing LoRA merge code: weights, adapters, scales, adversarial cases.

Import them in your own ``@given`` tests::

    from hypothesis import given
    from pytest_safemerge.strategies import lora_adapters, scales, weights

Whole layers with adapters for the module-level contract (:func:`layer_cases`) live in
:mod:`pytest_safemerge.layer_strategies` and are re-exported here.

Every strategy is a plural noun returning a ``SearchStrategy``; options are keyword-only
and checked when the strategy is built, before anything is drawn (a bad option raises
``hypothesis.errors.InvalidArgument`` naming ``name=value`` and the fix).

How values are made: the bulk of a tensor comes from a drawn seed through
``torch.Generator`` (fast at any size), while what a property hinges on (sizes, the
position and value of a planted NaN, the magnitudes near a dtype's limit, the scale) is
drawn by Hypothesis itself. A shrunk failure therefore reads as a small, concrete case:
a 1x1 weight, rank 1, a NaN in the last element of ``lora_A``, scale 1.0.

This module is the public front: it only re-exports. The builders live in the private
package :mod:`pytest_safemerge._strategies` (argument checks, values and rounding,
tensors, adversarial adapters, merge cases, quantization settings), which uses only
safemerge's public names and ``safemerge.numerics`` (dtype facts: ``SUPPORTED_DTYPES``,
``overflow_threshold``, ``int_view``). It imports torch at module top; the plugin's entry
module does not import it, so pytest stays light.
"""

from __future__ import annotations

from pytest_safemerge._strategies.adversarial import AdversarialAdapter, adversarial_adapters
from pytest_safemerge._strategies.cases import MergeCase, kinds_for_dtype, merge_cases
from pytest_safemerge._strategies.kinds import ADAPTER_KINDS, ADVERSARIAL_KINDS, MERGE_CASE_KINDS
from pytest_safemerge._strategies.kinds import MUST_REFUSE_KINDS as MUST_REFUSE_KINDS
from pytest_safemerge._strategies.kinds import WEIGHT_KINDS as WEIGHT_KINDS
from pytest_safemerge._strategies.quantization import QUANT_TYPES as QUANT_TYPES
from pytest_safemerge._strategies.quantization import QuantizationConfig, quantization_configs
from pytest_safemerge._strategies.tensors import ELEMENTS as ELEMENTS
from pytest_safemerge._strategies.tensors import EXTREME_SCALES as EXTREME_SCALES
from pytest_safemerge._strategies.tensors import ORDINARY_SCALES as ORDINARY_SCALES
from pytest_safemerge._strategies.tensors import lora_adapters, scales, weights
from pytest_safemerge._strategies.values import ADAPTER_DTYPES as ADAPTER_DTYPES
from pytest_safemerge._strategies.values import F32_MAX as F32_MAX
from pytest_safemerge._strategies.values import FP16_MAX as FP16_MAX
from pytest_safemerge._strategies.values import representable as representable
from pytest_safemerge.layer_strategies import LayerCase, layer_cases

__all__ = [
    "ADAPTER_KINDS",
    "ADVERSARIAL_KINDS",
    "MERGE_CASE_KINDS",
    "AdversarialAdapter",
    "LayerCase",
    "MergeCase",
    "QuantizationConfig",
    "adversarial_adapters",
    "kinds_for_dtype",
    "layer_cases",
    "lora_adapters",
    "merge_cases",
    "quantization_configs",
    "scales",
    "weights",
]
# Public outside ``__all__`` (as before the split): ADAPTER_DTYPES, ELEMENTS,
# EXTREME_SCALES, F32_MAX, FP16_MAX, MUST_REFUSE_KINDS, ORDINARY_SCALES, QUANT_TYPES; new:
# WEIGHT_KINDS and representable (imported ``as`` themselves: re-exported).
