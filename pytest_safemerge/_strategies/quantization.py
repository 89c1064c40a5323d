"""bitsandbytes settings for a quantized layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy

from pytest_safemerge._strategies import validation
from safemerge import names

QUANT_TYPES = names.QUANT_TYPES


@dataclass(frozen=True)
class QuantizationConfig:
    """bitsandbytes settings for a quantized layer.

    Attributes:
        quant_type: ``"nf4"`` or ``"fp4"`` (``Linear4bit``), or ``"int8"`` (``Linear8bitLt``).
        blocksize: 4-bit absmax block size (a power of two); None for int8 (row-wise).
        nested: 4-bit double quantization of the absmax (``compress_statistics``).
        threshold: int8 outlier threshold (``0.0`` disables outliers); None for 4-bit.
    """

    quant_type: str
    blocksize: int | None = None
    nested: bool = False
    threshold: float | None = None

    @property
    def settings(self) -> dict[str, Any]:
        """The settings as ``QuantizedFuseRecord.settings`` reports them."""
        if self.quant_type == "int8":
            return {"threshold": self.threshold}
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "nested": self.nested}


def quantization_configs(
    *,
    quant_types: Sequence[str] = QUANT_TYPES,
    min_blocksize: int = 32,
    max_blocksize: int = 4096,
) -> SearchStrategy[QuantizationConfig]:
    """:class:`QuantizationConfig` values: NF4/FP4 with a power-of-two blocksize in
    ``min_blocksize..max_blocksize`` (shrinking to 64) and nested or not; int8 with
    threshold 0.0 or 6.0 (bitsandbytes' default)."""
    quant_types = validation.check_kinds("quant_types", quant_types, QUANT_TYPES)
    for name, value in (("min_blocksize", min_blocksize), ("max_blocksize", max_blocksize)):
        validation.check_int(name, value, low=32, high=4096)
        if value & (value - 1):
            raise InvalidArgument(f"{name}={value!r} must be a power of two, e.g. {name}=64")
    if min_blocksize > max_blocksize:
        raise InvalidArgument(
            f"min_blocksize={min_blocksize!r} is above max_blocksize={max_blocksize!r}; swap them"
        )
    exponents = range(int(math.log2(min_blocksize)), int(math.log2(max_blocksize)) + 1)
    blocksizes = sorted((2**e for e in exponents), key=lambda b: (b != 64, b))
    parts = []
    four_bit = [q for q in quant_types if q != "int8"]
    if four_bit:
        parts.append(
            st.builds(
                QuantizationConfig,
                quant_type=st.sampled_from(four_bit),
                blocksize=st.sampled_from(blocksizes),
                nested=st.booleans(),
            )
        )
    if "int8" in quant_types:
        parts.append(
            st.builds(
                QuantizationConfig,
                quant_type=st.just("int8"),
                threshold=st.sampled_from((0.0, 6.0)),
            )
        )
    return st.one_of(*parts)
