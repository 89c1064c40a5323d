"""bitsandbytes-quantized Linear weights as transformers saves and loads them.

A model loaded with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
is saved by each bitsandbytes layer's own ``state_dict``, under the module's prefix:

- 4-bit: ``weight`` (the packed codes, ``(ceil(n / 2), 1)`` uint8), ``weight.absmax``
  (float32, or uint8 when nested), ``weight.quant_map`` (the 16 codes), when nested
  ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
  ``weight.quant_state.bitsandbytes__<nf4|fp4>``: the state's other fields as JSON bytes;
- 8-bit: ``weight`` (int8 rows), ``SCB`` (float32 row scales), ``weight_format`` (uint8
  scalar, 0: row-major).

The streaming writer writes each shard's header before its data, so every tensor's
shape is planned before the layer is quantized (:func:`planned`). Only the JSON's length
is not known then (its ``nested_offset`` is a float): it is planned at its longest and
padded with spaces, which JSON ignores after the value.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from safemerge import names
from safemerge.errors import AdapterConfigError
from safemerge.quant import bnb

#: bitsandbytes' nested absmax blocks (``quantize_4bit(compress_statistics=True)``).
NESTED_BLOCKSIZE = 256
#: Blocksizes bitsandbytes' 4-bit quantizer takes.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: ``Linear8bitLt``'s outlier threshold, as ``BitsAndBytesConfig`` defaults it.
INT8_THRESHOLD = 6.0
#: The longest ``repr`` of a finite float64, planned for the nested offset in the JSON.
_LONGEST_FLOAT = -1.2345678901234567e-308


@dataclass(frozen=True)
class QuantSpec:
    """How a Linear weight is quantized: bitsandbytes' settings as transformers names them.

    Attributes:
        quant_type: ``"nf4"``, ``"fp4"`` (``Linear4bit``) or ``"int8"`` (``Linear8bitLt``).
        blocksize: values per absmax block (4-bit; transformers always uses 64).
        nested: the absmax itself quantized (``bnb_4bit_use_double_quant``; 4-bit only).
    """

    quant_type: str
    blocksize: int = 64
    nested: bool = False

    def __post_init__(self) -> None:
        if self.quant_type not in names.QUANT_TYPES:
            raise AdapterConfigError(
                f"quantization {self.quant_type!r} is not one safemerge writes; choose one of "
                f"{names.listed(names.QUANT_TYPES)}"
            )
        if self.blocksize not in BLOCKSIZES:
            raise AdapterConfigError(
                f"blocksize {self.blocksize} is not one bitsandbytes quantizes with; choose "
                f"one of {names.listed(str(size) for size in BLOCKSIZES)}"
            )
        if not self.four_bit and (self.nested or self.blocksize != 64):
            raise AdapterConfigError(
                "int8 quantizes whole rows: a blocksize or nesting applies to nf4 and fp4 only"
            )

    @property
    def four_bit(self) -> bool:
        return self.quant_type in names.FOUR_BIT_TYPES

    def describe(self) -> str:
        """``"nf4/64"``, ``"nf4/64/nested"``, ``"int8"``: short, for tables and JSON."""
        if not self.four_bit:
            return self.quant_type
        return f"{self.quant_type}/{self.blocksize}" + ("/nested" if self.nested else "")


def quantized_linear(weight: torch.Tensor, spec: QuantSpec) -> nn.Module:
    """A bitsandbytes layer on the CPU holding ``weight`` (``(out, in)``) quantized as
    ``spec`` says, from the values in their own dtype, as transformers quantizes them
    when it loads a 16-bit checkpoint. The quant state's dtype (what dequantization
    returns) is ``weight``'s."""
    bnb_module: Any = importlib.import_module("bitsandbytes")  # optional: imported when used
    out_features, in_features = (int(size) for size in weight.shape)
    data = weight.detach().cpu().contiguous()
    layer: Any
    if spec.four_bit:
        layer = bnb_module.nn.Linear4bit(
            in_features,
            out_features,
            bias=False,
            compute_dtype=weight.dtype,
            compress_statistics=spec.nested,
            quant_type=spec.quant_type,
            device="meta",
        )
        layer.weight = bnb_module.nn.Params4bit(
            data,
            requires_grad=False,
            quant_type=spec.quant_type,
            compress_statistics=spec.nested,
            blocksize=spec.blocksize,
        )
    else:
        layer = bnb_module.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=False,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        layer.weight = bnb_module.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    quantized: nn.Module = layer.to("cpu")  # bitsandbytes quantizes on the move to a device
    return quantized


def dequantized(layer: nn.Module, name: str) -> torch.Tensor:
    """The weight a bitsandbytes layer holds, float32 ``(out, in)``: ``code * absmax``
    computed by safemerge (bitsandbytes' CPU ``dequantize_4bit`` misplaces the absmax of
    blocks that straddle rows), or ``int8 * SCB / 127``."""
    quantized_format = bnb.format_of(layer, name)
    if quantized_format is None:
        raise AdapterConfigError(f"{name!r} is not a bitsandbytes Linear4bit or Linear8bitLt")
    with torch.no_grad():
        return quantized_format.read()


def planned(
    prefix: str, shape: Sequence[int], spec: QuantSpec, dtype: torch.dtype
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The tensors :func:`layer_tensors` gives for a Linear weight of ``shape`` quantized
    as ``spec`` from ``dtype``: ``(name, shape, dtype)`` each, in that order.

    ``prefix`` is the module's name with its dot (``"model.layers.0.mlp.up_proj."``).
    """
    rows, columns = (int(size) for size in shape)
    if not spec.four_bit:
        return [
            (prefix + "weight", (rows, columns), torch.int8),
            (prefix + "SCB", (rows,), torch.float32),
            (prefix + "weight_format", (), torch.uint8),
        ]
    numel = rows * columns
    blocks = math.ceil(numel / spec.blocksize)
    entries = [
        (prefix + "weight", ((numel + 1) // 2, 1), torch.uint8),
        (prefix + "weight.absmax", (blocks,), torch.uint8 if spec.nested else torch.float32),
        (prefix + "weight.quant_map", (16,), torch.float32),
    ]
    if spec.nested:
        entries += [
            (
                prefix + "weight.nested_absmax",
                (math.ceil(blocks / NESTED_BLOCKSIZE),),
                torch.float32,
            ),
            (prefix + "weight.nested_quant_map", (256,), torch.float32),
        ]
    state_bytes = len(_state_json(spec, (rows, columns), dtype, _LONGEST_FLOAT))
    entries.append((prefix + _state_key(spec), (state_bytes,), torch.uint8))
    return entries


def layer_tensors(prefix: str, layer: nn.Module, spec: QuantSpec) -> list[tuple[str, torch.Tensor]]:
    """A quantized layer's tensors under transformers' names, in :func:`planned`'s order.

    They are the layer's own ``state_dict`` (what ``save_pretrained`` writes), the
    state's JSON padded with spaces to its planned length.
    """
    state = {key: value for key, value in layer.state_dict().items() if key != "bias"}
    weight: Any = layer.weight
    shape = tuple(
        int(size) for size in (weight.quant_state.shape if spec.four_bit else weight.shape)
    )
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, planned_shape, _ in planned(prefix, shape, spec, _state_dtype(layer, spec)):
        key = name.removeprefix(prefix)
        tensor = state.pop(key)
        if key == _state_key(spec):
            padding = planned_shape[0] - tensor.numel()
            assert padding >= 0, "the quant state's JSON is longer than its longest form"
            tensor = torch.cat([tensor, torch.full((padding,), ord(" "), dtype=torch.uint8)])
        tensors.append((name, tensor.detach().contiguous()))
    assert not state, f"unplanned quantization tensors {sorted(state)}"
    return tensors


def quantization_config_fields(spec: QuantSpec, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The ``BitsAndBytesConfig`` arguments that describe ``spec``."""
    if not spec.four_bit:
        return {"load_in_8bit": True, "llm_int8_threshold": INT8_THRESHOLD}
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": spec.quant_type,
        "bnb_4bit_use_double_quant": spec.nested,
        "bnb_4bit_compute_dtype": compute_dtype,
    }


def _state_key(spec: QuantSpec) -> str:
    return f"weight.quant_state.bitsandbytes__{spec.quant_type}"


def _state_dtype(layer: nn.Module, spec: QuantSpec) -> torch.dtype:
    weight: Any = layer.weight
    dtype: torch.dtype = weight.quant_state.dtype if spec.four_bit else torch.float16
    return dtype


def _state_json(
    spec: QuantSpec, shape: tuple[int, int], dtype: torch.dtype, nested_offset: float
) -> bytes:
    """The JSON bitsandbytes packs (``QuantState.as_dict(packed=True)``), for its length."""
    fields: dict[str, Any] = {
        "quant_type": spec.quant_type,
        "blocksize": spec.blocksize,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": list(shape),
    }
    if spec.nested:
        fields |= {
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": nested_offset,
        }
    return json.dumps(fields).encode("utf-8")
