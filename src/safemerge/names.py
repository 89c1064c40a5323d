"""The names safemerge's parts share: dtypes, quantization types, layer kinds and tags.

Torch-free, so that the command line's parser and the pytest plugin's options can use
them without importing torch. Every list of these names in the project comes from here,
and :func:`listed` formats them one way.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Weight dtypes safemerge fuses into (torch's names); the merge is computed in float32.
WEIGHT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
#: Dtypes ``safemerge fuse --dtype`` writes and ``safemerge demo --dtype`` generates.
OUTPUT_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

#: bitsandbytes 4-bit quantization types (``Linear4bit``'s ``quant_type``).
FOUR_BIT_TYPES: tuple[str, ...] = ("nf4", "fp4")
#: Every quantized base safemerge fuses: the 4-bit types and ``Linear8bitLt``'s int8.
QUANT_TYPES: tuple[str, ...] = (*FOUR_BIT_TYPES, "int8")

#: Unquantized layer kinds (``fan_in_fan_out``: a 2-D weight stored ``(in, out)``, as
#: GPT-2's ``Conv1D``; the name of the adapter option that says so).
UNQUANTIZED_KINDS: tuple[str, ...] = (
    "linear",
    "embedding",
    "conv1d",
    "conv2d",
    "conv3d",
    "fan_in_fan_out",
)
#: Every layer kind, quantized ones named by their quantization type.
LAYER_KINDS: tuple[str, ...] = (*UNQUANTIZED_KINDS, *QUANT_TYPES)
#: Adapter options a layer-suite implementation may declare beside its layer kinds.
OPTION_TAGS: tuple[str, ...] = ("lora-bias", "dora", "several")
#: Everything an implementation's ``layer_kinds`` may name.
ALL_TAGS: frozenset[str] = frozenset((*LAYER_KINDS, *OPTION_TAGS))
#: Earlier spellings still accepted in ``layer_kinds``, and what they mean now.
TAG_ALIASES: dict[str, str] = {"fan-in-fan-out": "fan_in_fan_out"}


def listed(names: Iterable[str]) -> str:
    """``"a, b, c"``: how every message and help text lists names."""
    return ", ".join(names)
