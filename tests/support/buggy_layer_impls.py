"""Module-level merge implementations with deliberate bugs, for the layer conformance suite.

``pytest --safemerge-impl=support.buggy_layer_impls:NAME`` runs the tensor and the layer
suite against one of them; ``tests/pytest_safemerge/test_layer_suite_power.py`` checks that
the layer suite fails each bug in the property :data:`BUGS` names, and passes
:data:`CORRECT_LAYER` and :data:`CORRECT_LAYER_ARITHMETIC`.

The reference, :class:`CorrectLayerMerge`, is plain torch and bitsandbytes' quantizers,
written without safemerge's engine, and merges the adapters one after the other, each
merge rounded to the weight's dtype (or requantized), as PEFT does; it computes and
checks the weight and the bias before it writes either. Each bug is a subclass that
changes one line of one step, so that the bug is the whole difference.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import bitsandbytes.functional as bnb_functional
import torch
from torch import Tensor, nn

import safemerge
from pytest_safemerge.suite.layer_contract import LAYER_PROPERTY_NAMES


class LayerMergeRefused(ValueError):
    """The merged weight or bias would not be finite in its dtype."""


def _float32(tensor: Tensor) -> Tensor:
    return tensor.detach().to(torch.float32)


def _quant_kind(layer: nn.Module) -> str | None:
    name = type(layer).__name__
    return {"Linear4bit": "4bit", "Linear8bitLt": "int8"}.get(name)


def _absmax_4bit(state: Any) -> Tensor:
    """Each block's absmax, float32, in block order (a nested one dequantized)."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float()


def _code_values_4bit(packed: Tensor, state: Any) -> Tensor:
    """Each element's code value (before its block's absmax), flat, in row-major order."""
    data = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1).long()
    return state.code.float()[codes]


def _dequantize_4bit(packed: Tensor, state: Any) -> Tensor:
    """``code * absmax``, as the layer's values are (bitsandbytes 0.50's CPU
    ``dequantize_4bit`` misplaces the absmax of some blocks that span rows)."""
    values = _code_values_4bit(packed, state)
    numel = int(state.shape[0]) * int(state.shape[1])
    padded = torch.nn.functional.pad(values, (0, (-values.numel()) % state.blocksize))
    blocks = padded.reshape(-1, state.blocksize) * _absmax_4bit(state)[:, None]
    return blocks.reshape(-1)[:numel].reshape(tuple(state.shape))


class CorrectLayerMerge:
    """Adapters merged one at a time in float32, each rounded (or requantized); the bias in
    float32 then cast; all checked before anything is written. Exact unfuse from a copy of
    the layer's state kept at each fuse."""

    exact_unfuse = True

    def __init__(self) -> None:
        # id(layer) -> what the layer held before each fuse, latest last.
        self._saved: dict[int, list[dict[str, Any]]] = {}

    # --- the steps each bug changes one line of --------------------------------------------

    def coefficients(self, adapters: list[safemerge.LoraAdapter], scale: float) -> list[float]:
        return [scale * adapter.scale for adapter in adapters]

    def delta(self, layer: nn.Module, adapter: safemerge.LoraAdapter, c: float) -> Tensor:
        """``c * B @ A`` in float32, in the layout of the layer's weight."""
        up = _float32(adapter.lora_B) * c
        down = _float32(adapter.lora_A)
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if self.transposed(layer):
            return product.T
        return product.reshape(self.shape(layer))

    def renormalised(self, layer: nn.Module, merged: Tensor, magnitude: Tensor) -> Tensor:
        """DoRA: ``m / ||W + delta||`` per output channel, times ``W + delta``."""
        matrix = merged.reshape(merged.shape[0], -1).double()
        out_axis = 1 if self.transposed(layer) else 0
        norms = torch.linalg.vector_norm(matrix, dim=1 - out_axis, keepdim=True)
        shape = (1, -1) if out_axis == 1 else (-1, 1)
        factor = magnitude.double().reshape(shape) / norms
        return (matrix * factor).float().reshape(merged.shape)

    def checked_cast(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool((torch.isfinite(merged) & torch.isfinite(cast.float())).all()):
            raise LayerMergeRefused(f"the merged weight is not finite in {dtype}")
        return cast

    def checked_bias(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool(torch.isfinite(cast.float()).all()):
            raise LayerMergeRefused(f"the merged bias is not finite in {dtype}")
        return cast

    def quantize_int8(self, merged: Tensor) -> tuple[Tensor, Tensor]:
        half = self.checked_cast(merged, torch.float16)  # Int8Params quantize through float16
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(half)
        return codes, scales

    def quantize_4bit(self, layer: nn.Module, merged: Tensor) -> tuple[Tensor, Any]:
        weight: Any = layer.weight
        state = weight.quant_state
        packed, new_state = bnb_functional.quantize_4bit(
            self.checked_cast(merged, torch.float32),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=weight.data.dtype,
        )
        new_state.dtype = state.dtype
        return packed, new_state

    def dequantize_4bit(self, packed: Tensor, state: Any) -> Tensor:
        """A 4-bit weight's values, float32 ``(out, in)``."""
        return _dequantize_4bit(packed, state)

    def merged_bias(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], coefficients: list[float]
    ) -> Tensor | None:
        bias = getattr(layer, "bias", None)
        if bias is None or all(adapter.lora_bias is None for adapter in adapters):
            return None
        merged = _float32(bias).clone()
        for adapter, c in zip(adapters, coefficients, strict=True):
            if adapter.lora_bias is not None:
                merged += _float32(adapter.lora_bias) * c
        return self.checked_bias(merged, bias.dtype)

    # --- reading, rounding and writing a layer's weight ------------------------------------

    def transposed(self, layer: nn.Module) -> bool:
        return isinstance(layer, (nn.Embedding, safemerge.synthetic.TransposedLinear))

    def shape(self, layer: nn.Module) -> tuple[int, ...]:
        """The weight's shape (``(out, in)`` for a bitsandbytes layer)."""
        weight: Any = layer.weight
        if _quant_kind(layer) == "4bit":
            return tuple(int(size) for size in weight.quant_state.shape)
        return tuple(weight.shape)

    def read(self, layer: nn.Module) -> Tensor:
        """The weight as float32 (dequantized for a bitsandbytes layer)."""
        weight: Any = layer.weight
        kind = _quant_kind(layer)
        if kind == "4bit":
            return self.dequantize_4bit(weight.data, weight.quant_state)
        if kind == "int8":
            return weight.data.float() * (weight.SCB.float()[:, None] / 127)
        return _float32(weight)

    def rounded(self, layer: nn.Module, merged: Tensor, stored: Any) -> tuple[Any, Tensor]:
        """``merged`` as the layer stores it, and that stored form as float32 again."""
        kind = _quant_kind(layer)
        if kind == "4bit":
            packed, state = self.quantize_4bit(layer, merged)
            return (packed, state), self.dequantize_4bit(packed, state)
        if kind == "int8":
            codes, scales = self.quantize_int8(merged)
            return (codes, scales), codes.float() * (scales.float()[:, None] / 127)
        cast = self.checked_cast(merged, layer.weight.dtype)
        return cast, cast.float()

    def new_weight(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], coefficients: list[float]
    ) -> Any:
        values, stored = self.read(layer), None
        for adapter, c in zip(adapters, coefficients, strict=True):
            merged = values + self.delta(layer, adapter, c)
            if adapter.magnitude is not None:
                merged = self.renormalised(layer, merged, adapter.magnitude)
            stored, values = self.rounded(layer, merged, stored)
        return stored

    def write_weight(self, layer: nn.Module, stored: Any) -> None:
        weight: Any = layer.weight
        kind = _quant_kind(layer)
        if kind == "4bit":
            weight.data, weight.quant_state = stored
        elif kind == "int8":
            weight.data, weight.SCB = stored
            weight.CB = weight.data
        else:
            weight.data.copy_(stored)

    def write_bias(self, layer: nn.Module, bias: Tensor | None) -> None:
        if bias is not None:
            layer.bias.data.copy_(bias)  # type: ignore[union-attr]

    # --- the contracts ---------------------------------------------------------------------

    def fuse(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
        """The tensor contract, which loading an implementation requires (the layer suite is
        what these are for): a float32 merge, checked, then written."""
        with torch.no_grad():
            merged = _float32(weight) + scale * (_float32(lora_B) @ _float32(lora_A))
            weight.copy_(self.checked_cast(merged, weight.dtype))

    def fuse_layer(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], scale: float
    ) -> None:
        with torch.no_grad():
            coefficients = self.coefficients(adapters, scale)
            weight = self.new_weight(layer, adapters, coefficients)
            bias = self.merged_bias(layer, adapters, coefficients)
            self.remember(layer, adapters, coefficients)
            self.write_weight(layer, weight)
            self.write_bias(layer, bias)

    def unfuse_layer(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], scale: float
    ) -> None:
        saved = self._stack(layer).pop()
        weight: Any = layer.weight
        with torch.no_grad():
            for name, value in saved["attributes"].items():
                setattr(weight, name, value)
            if saved["bias"] is not None:
                layer.bias.data.copy_(saved["bias"])  # type: ignore[union-attr]

    def remember(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], coefficients: list[float]
    ) -> None:
        weight: Any = layer.weight
        attributes = {"data": weight.data.clone()}
        for name in ("quant_state", "CB", "SCB"):
            if getattr(weight, name, None) is not None:
                attributes[name] = copy.deepcopy(getattr(weight, name))
        if _quant_kind(layer) == "int8":
            attributes["CB"] = attributes["data"]
        bias = getattr(layer, "bias", None)
        saved = {"attributes": attributes, "bias": None if bias is None else bias.detach().clone()}
        saved["adapters"], saved["coefficients"] = adapters, coefficients
        self._stack(layer).append(saved)

    def _stack(self, layer: nn.Module) -> list[dict[str, Any]]:
        key = id(layer)
        if key not in self._saved:
            self._saved[key] = []
            weakref.finalize(layer, self._saved.pop, key, None)
        return self._saved[key]


class CorrectLayerMergeArithmetic(CorrectLayerMerge):
    """Unfuse by merging the negated deltas, one at a time in reverse order (DoRA: divide
    by the factor the fuse used, then subtract): not exact, within the two merges' bounds."""

    exact_unfuse = False

    def unfuse_layer(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], scale: float
    ) -> None:
        saved = self._stack(layer).pop()
        negated = [-c for c in self.coefficients(adapters, scale)]
        with torch.no_grad():
            values, stored = self.read(layer), None
            for adapter, c in reversed(list(zip(adapters, negated, strict=True))):
                if adapter.magnitude is not None:
                    values = self.undo_renormalised(layer, values, saved)
                stored, values = self.rounded(layer, values + self.delta(layer, adapter, c), stored)
            bias = self.unfused_bias(layer, adapters, negated)
            self.write_weight(layer, stored)
            self.write_bias(layer, bias)

    def unfused_bias(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], negated: list[float]
    ) -> Tensor | None:
        return self.merged_bias(layer, adapters, negated)

    def undo_renormalised(self, layer: nn.Module, values: Tensor, saved: dict[str, Any]) -> Tensor:
        """Divide by the factor ``m / ||W + delta||`` of the fuse (recomputed from the
        weight the fuse started from, as PEFT caches the norm)."""
        (adapter,), (c,) = saved["adapters"], saved["coefficients"]
        original = saved["attributes"]["data"].float()
        matrix = (original + self.delta(layer, adapter, c)).reshape(original.shape[0], -1).double()
        out_axis = 1 if self.transposed(layer) else 0
        norms = torch.linalg.vector_norm(matrix, dim=1 - out_axis, keepdim=True)
        shape = (1, -1) if out_axis == 1 else (-1, 1)
        factor = adapter.magnitude.double().reshape(shape) / norms
        divided = values.reshape(values.shape[0], -1).double() / factor
        return divided.float().reshape(values.shape)


# --- the bugs ------------------------------------------------------------------------------------


class BiasGuardedBeforeCast(CorrectLayerMerge):
    """Checks the float32 bias sum, then casts unchecked: a sum finite in float32 but beyond
    float16's 65504 is written as Inf (PEFT's guards check ``isfinite`` before the cast)."""

    def checked_bias(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool(torch.isfinite(merged).all()):
            raise LayerMergeRefused(f"the merged bias is not finite in {dtype}")
        return cast


class LoraBiasUnscaled(CorrectLayerMerge):
    """Adds lora_bias without the adapter's scale and the overall scale."""

    def merged_bias(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], coefficients: list[float]
    ) -> Tensor | None:
        bias = getattr(layer, "bias", None)
        if bias is None or all(adapter.lora_bias is None for adapter in adapters):
            return None
        merged = _float32(bias).clone()
        for adapter, _c in zip(adapters, coefficients, strict=True):
            if adapter.lora_bias is not None:
                merged += _float32(adapter.lora_bias)
        return self.checked_bias(merged, bias.dtype)


class WeightBeforeBiasCheck(CorrectLayerMerge):
    """Writes the merged weight, then computes and checks the bias: a refused bias leaves
    the weight merged."""

    def fuse_layer(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], scale: float
    ) -> None:
        with torch.no_grad():
            coefficients = self.coefficients(adapters, scale)
            weight = self.new_weight(layer, adapters, coefficients)
            self.remember(layer, adapters, coefficients)
            self.write_weight(layer, weight)
            bias = self.merged_bias(layer, adapters, coefficients)  # after the weight is written
            self.write_bias(layer, bias)


class BiasCheckWithoutAll(CorrectLayerMerge):
    """``if not torch.isfinite(cast):`` without ``.all()``: ``bool()`` of a tensor of more
    than one element raises, so every merge into a bias of 2 or more elements is refused
    (PEFT's ``tuners/lora`` has had a guard that lost its ``.all()``)."""

    def checked_bias(self, merged: Tensor, dtype: torch.dtype) -> Tensor:
        cast = merged.to(dtype)
        if not bool(torch.isfinite(cast.float())):
            raise LayerMergeRefused(f"the merged bias is not finite in {dtype}")
        return cast


class DoraNormWrongAxis(CorrectLayerMerge):
    """DoRA's weight norm taken along the output channels instead of across each one."""

    def renormalised(self, layer: nn.Module, merged: Tensor, magnitude: Tensor) -> Tensor:
        matrix = merged.reshape(merged.shape[0], -1).double()
        out_axis = 1 if self.transposed(layer) else 0
        norms = torch.linalg.vector_norm(matrix, dim=out_axis, keepdim=True)
        shape = (1, -1) if out_axis == 1 else (-1, 1)
        factor = magnitude.double().reshape(shape) / norms
        return (matrix * factor).float().reshape(merged.shape)


class Int8GuardedInFloat32(CorrectLayerMerge):
    """Checks the int8 merge in float32, then quantizes it through float16 unchecked: a
    merged value beyond 65504 becomes Inf and the row's codes garbage (PEFT's
    ``Linear8bitLt.merge``: ``isfinite`` on the float sum, then ``Int8Params``)."""

    def quantize_int8(self, merged: Tensor) -> tuple[Tensor, Tensor]:
        half = self.checked_cast(merged, torch.float32).to(torch.float16)
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(half)
        return codes, scales


class OneScaleForAll(CorrectLayerMerge):
    """Several adapters merged with the first adapter's scale for all of them."""

    def coefficients(self, adapters: list[safemerge.LoraAdapter], scale: float) -> list[float]:
        return [scale * adapters[0].scale for adapter in adapters]


class DefaultBlocksize(CorrectLayerMerge):
    """Requantizes a 4-bit weight with bitsandbytes' default blocksize (64) instead of the
    layer's own: the quantization state changes form."""

    def quantize_4bit(self, layer: nn.Module, merged: Tensor) -> tuple[Tensor, Any]:
        weight: Any = layer.weight
        state = weight.quant_state
        packed, new_state = bnb_functional.quantize_4bit(
            self.checked_cast(merged, torch.float32),
            blocksize=64,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=weight.data.dtype,
        )
        new_state.dtype = state.dtype
        return packed, new_state


class ScalesAdapterInPlace(CorrectLayerMerge):
    """Folds the coefficient into lora_B in place (``.float()`` of a float32 tensor is the
    tensor itself): the adapter is changed."""

    def delta(self, layer: nn.Module, adapter: safemerge.LoraAdapter, c: float) -> Tensor:
        up = _float32(adapter.lora_B).mul_(c)
        down = _float32(adapter.lora_A)
        product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if self.transposed(layer):
            return product.T
        return product.reshape(self.shape(layer))


class RowBlocksTransposed(CorrectLayerMerge):
    """Dequantizes a 4-bit weight whose rows are whole blocks by a row-wise fast path that
    takes the blocks, stored ``(out, blocks per row)``, as ``(blocks per row, out)``: a
    block lands in another row's place. Rows narrower than a block take the flat path,
    which is right, so only layers with several rows of several blocks show it, as real
    layers are (and the suite's aligned 4-bit shapes: in 64 or 128, blocksize 32 or 64). A
    fast path like the row-wise one bitsandbytes 0.50's CPU dequantize_4bit takes whenever
    a row's length is even (which, the other way round, misreads blocks that straddle rows
    on some CPUs)."""

    def dequantize_4bit(self, packed: Tensor, state: Any) -> Tensor:
        out_features, in_features = (int(size) for size in state.shape)
        if in_features % state.blocksize:
            return super().dequantize_4bit(packed, state)  # blocks straddle rows: flat
        values = _code_values_4bit(packed, state).reshape(-1, state.blocksize)
        blocks = values * _absmax_4bit(state)[:, None]  # in storage order
        per_row = in_features // state.blocksize
        by_row = blocks.reshape(per_row, out_features, -1).transpose(0, 1)  # is (out, per_row)
        return by_row.reshape(out_features, in_features)


class ProductInAdapterDtype(CorrectLayerMerge):
    """Computes ``(B @ A) * c`` in the adapters' own dtype and upcasts the product: with
    float16 or bfloat16 adapters the delta is rounded to them (each rank's sum too) before
    the float32 add, far beyond a float32 weight's bound. PEFT's
    ``lora.Linear.get_delta_weight`` multiplies in the adapters' dtype off the CPU (on the
    CPU it upcasts, and rounds the product back to that dtype)."""

    def delta(self, layer: nn.Module, adapter: safemerge.LoraAdapter, c: float) -> Tensor:
        up = adapter.lora_B.detach()
        down = adapter.lora_A.detach()
        product = ((up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * c).float()
        if self.transposed(layer):
            return product.T
        return product.reshape(self.shape(layer))


class UnfuseForgetsLoraBias(CorrectLayerMergeArithmetic):
    """The arithmetic unfuse subtracts the deltas but leaves the bias merged."""

    def unfused_bias(
        self, layer: nn.Module, adapters: list[safemerge.LoraAdapter], negated: list[float]
    ) -> Tensor | None:
        return None


CORRECT_LAYER = CorrectLayerMerge()
CORRECT_LAYER_ARITHMETIC = CorrectLayerMergeArithmetic()
BIAS_GUARDED_BEFORE_CAST = BiasGuardedBeforeCast()
LORA_BIAS_UNSCALED = LoraBiasUnscaled()
WEIGHT_BEFORE_BIAS_CHECK = WeightBeforeBiasCheck()
BIAS_CHECK_WITHOUT_ALL = BiasCheckWithoutAll()
DORA_NORM_WRONG_AXIS = DoraNormWrongAxis()
INT8_GUARDED_IN_FLOAT32 = Int8GuardedInFloat32()
ONE_SCALE_FOR_ALL = OneScaleForAll()
DEFAULT_BLOCKSIZE = DefaultBlocksize()
SCALES_ADAPTER_IN_PLACE = ScalesAdapterInPlace()
UNFUSE_FORGETS_LORA_BIAS = UnfuseForgetsLoraBias()
ROW_BLOCKS_TRANSPOSED = RowBlocksTransposed()
PRODUCT_IN_ADAPTER_DTYPE = ProductInAdapterDtype()

#: name -> (the implementation, the property's test expected to catch it).
BUGS: dict[str, tuple[object, str]] = {
    "BIAS_GUARDED_BEFORE_CAST": (BIAS_GUARDED_BEFORE_CAST, "test_fuse_layer_refuses_non_finite"),
    "LORA_BIAS_UNSCALED": (LORA_BIAS_UNSCALED, "test_fuse_layer_is_accurate"),
    "WEIGHT_BEFORE_BIAS_CHECK": (
        WEIGHT_BEFORE_BIAS_CHECK,
        "test_layer_refusal_leaves_layer_unchanged",
    ),
    "BIAS_CHECK_WITHOUT_ALL": (BIAS_CHECK_WITHOUT_ALL, "test_fuse_layer_is_accurate"),
    "DORA_NORM_WRONG_AXIS": (DORA_NORM_WRONG_AXIS, "test_fuse_layer_is_accurate"),
    "INT8_GUARDED_IN_FLOAT32": (INT8_GUARDED_IN_FLOAT32, "test_fuse_layer_refuses_non_finite"),
    "ONE_SCALE_FOR_ALL": (ONE_SCALE_FOR_ALL, "test_fuse_layer_is_accurate"),
    "DEFAULT_BLOCKSIZE": (DEFAULT_BLOCKSIZE, "test_fuse_layer_keeps_form"),
    "SCALES_ADAPTER_IN_PLACE": (
        SCALES_ADAPTER_IN_PLACE,
        "test_fuse_layer_leaves_adapters_unmodified",
    ),
    "UNFUSE_FORGETS_LORA_BIAS": (UNFUSE_FORGETS_LORA_BIAS, "test_unfuse_layer_round_trip"),
    # 4-bit (nf4, fp4) layers only: caught on rows of whole blocks, missed on narrow rows.
    "ROW_BLOCKS_TRANSPOSED": (ROW_BLOCKS_TRANSPOSED, "test_fuse_layer_is_accurate"),
    # Half adapters on unquantized layers (float32 weights above all).
    "PRODUCT_IN_ADAPTER_DTYPE": (PRODUCT_IN_ADAPTER_DTYPE, "test_fuse_layer_is_accurate"),
}
assert all(test in LAYER_PROPERTY_NAMES for _, test in BUGS.values())
