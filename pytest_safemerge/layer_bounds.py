"""What a correct ``fuse_layer`` (and ``unfuse_layer``) leaves in a layer, and how far off it
may be: float64 references and per-element bounds, for the weight and the bias.

One adapter: the weight's bound is exactly :func:`safemerge.expected_fuse`'s (a float32
merge and one rounding to the weight's dtype; DoRA's renormalisation included).

Several adapters may be merged in one float32 accumulation and one rounding (safemerge),
or one after the other, each merge rounded to the weight's dtype (PEFT), in either order.
The contract allows all of these, so every element is held to the largest of their
bounds. The bound of a merge done in steps composes the bound of each step: step ``i``
merges ``y_i = fl32(W_{i-1} + delta_i)`` where ``W_{i-1}`` is only known to lie within
``b_{i-1}`` of the exact ``R_{i-1}``, so the step's float32 accumulation bound is
evaluated with ``|W_{i-1}| <= |R_{i-1}| + b_{i-1}``, its rounding at
``|R_i| + b_{i-1} + acc_i``, and by the triangle inequality
``b_i = b_{i-1} + acc_i + rounding_i``.

Quantized layers (bitsandbytes) round each merge by requantizing: a step's rounding is
the quantizer's own bound (:func:`safemerge.quantization_bound`, per block or row),
evaluated at the exact merge, plus how much that bound can move when the quantized value
is off the exact one (see :func:`_quantized_step`).

Unfuse is one more merge, of the negated deltas: a round trip's bound composes the
fuse's and the unfuse's (DoRA divides by the factor first: :func:`_dora_unfuse`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import safemerge
from safemerge.merge.numerics import (
    FLOAT32_TINY_SUBNORMAL,
    U32,
    range_limit,
    ulp,
)

__all__ = ["Expected", "LayerExpectation", "expected_layer_fuse", "expected_layer_round_trip"]

#: float32's overflow threshold: its max plus half an ulp there (2**103) rounds to Inf.
#: How much a quantizer's bound can grow when what it quantizes moves by ``d`` (the
#: largest such move over the tensor): 4-bit, ``(h + 2u) s`` grows by at most ``d``
#: (``h < 1``), and a nested absmax's own rounding error, a distance to a grid of 8-bit
#: codes scaled by the group's absmax and shifted by the mean absmax (each moving by at
#: most ``2d``), by at most ``4d``; int8, ``SCB / 254`` by ``d / 254`` and the float16
#: rounding (a distance to the float16 grid) by ``d``. Five covers every case.
_QUANTIZER_LIPSCHITZ = 5.0
#: What the quantizer's bound can move by besides, relative to the largest magnitude:
#: the float16 rounding of an int8 row's absmax (2**-11 either side, over 254), and the
#: float32 roundings of a nested absmax's dequantization (a few u).
_QUANTIZER_RELATIVE = 2.0**-16

Term = tuple[torch.Tensor, torch.Tensor, float]


@dataclass(frozen=True)
class Expected:
    """One tensor of a merged layer: ``|actual - reference| <= bound`` everywhere.

    Attributes:
        name: ``"weight"`` (for a quantized layer, its dequantized ``(out, in)`` values)
            or ``"bias"``.
        reference: the exact result, float64, in the tensor's shape.
        bound: the bound per element, float64.
        limit: magnitudes from here on do not fit the dtype the result is stored in
            (float16 for an int8 layer, whose Int8Params quantize through float16).
    """

    name: str
    reference: torch.Tensor
    bound: torch.Tensor
    limit: float

    def fits(self) -> bool:
        """Every correct merge's value is surely within the storage dtype's range."""
        return bool(((self.reference.abs() + self.bound) < self.limit).all())


@dataclass(frozen=True)
class LayerExpectation:
    """What a merged layer holds: its weight, and its bias when an adapter has a lora_bias
    (otherwise the bias must keep every bit)."""

    weight: Expected
    bias: Expected | None

    def fits(self) -> bool:
        return self.weight.fits() and (self.bias is None or self.bias.fits())


def expected_layer_fuse(
    layer: Any, adapters: Sequence[safemerge.LoraAdapter], scale: float
) -> LayerExpectation:
    """What ``fuse_layer(layer, adapters, scale)`` must leave in ``layer`` (not changed here)."""
    layout = _layout(layer, adapters, scale)
    return LayerExpectation(
        _expected_weight(layout, round_trip=False), _expected_bias(layout, round_trip=False)
    )


def expected_layer_round_trip(
    layer: Any, adapters: Sequence[safemerge.LoraAdapter], scale: float
) -> LayerExpectation:
    """What ``fuse_layer`` then an arithmetic ``unfuse_layer`` of the same adapters must
    leave: the original values, within the bound of both merges."""
    layout = _layout(layer, adapters, scale)
    return LayerExpectation(
        _expected_weight(layout, round_trip=True), _expected_bias(layout, round_trip=True)
    )


# --- the layer as a matrix ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The layer's weight as the matrix ``M`` of :func:`safemerge.matrix_form` (float64),
    each adapter's ``(left, right, coefficient)`` with delta ``c * left @ right``."""

    layer: Any
    adapters: tuple[safemerge.LoraAdapter, ...]
    scale: float
    matrix: torch.Tensor
    terms: tuple[Term, ...]
    shape: tuple[int, ...]  # of the values compared: the weight's, or (out, in) if quantized
    dtype: torch.dtype | None  # the weight's; None for a quantized layer
    transposed: bool  # output channels are M's columns (embedding, fan_in_fan_out)

    @property
    def quantized(self) -> bool:
        return self.dtype is None


def _layout(layer: Any, adapters: Sequence[safemerge.LoraAdapter], scale: float) -> _Layout:
    quantized = type(layer).__module__.startswith("bitsandbytes")
    coefficients = [scale * adapter.scale for adapter in adapters]
    if quantized:
        values, _ = safemerge.quantization_bound(
            layer, torch.zeros(layer.out_features, layer.in_features)
        )
        matrix = values.detach().cpu().to(torch.float64)
        terms = tuple(
            (adapter.lora_B.detach().cpu(), adapter.lora_A.detach().cpu(), c)
            for adapter, c in zip(adapters, coefficients, strict=True)
        )
        return _Layout(
            layer, tuple(adapters), scale, matrix, terms, tuple(matrix.shape), None, False
        )
    weight = layer.weight.detach().cpu()
    kind = _matrix_kind(layer, adapters)
    terms_list = []
    matrix = weight
    for adapter, c in zip(adapters, coefficients, strict=True):
        matrix, right, left = safemerge.matrix_form(
            weight, adapter.lora_A.detach().cpu(), adapter.lora_B.detach().cpu(), kind
        )
        terms_list.append((left, right, c))
    matrix = matrix.reshape(weight.shape[0], -1).to(torch.float64)
    return _Layout(
        layer,
        tuple(adapters),
        scale,
        matrix,
        tuple(terms_list),
        tuple(weight.shape),
        weight.dtype,
        kind in ("embedding", "fan_in_fan_out"),
    )


def _matrix_kind(layer: Any, adapters: Sequence[safemerge.LoraAdapter]) -> str:
    if isinstance(layer, torch.nn.Embedding):
        return "embedding"
    if any(adapter.fan_in_fan_out for adapter in adapters):
        return "fan_in_fan_out"
    return "linear"  # a convolution's kernel is folded into M's columns, as a linear's


def _negated(terms: Sequence[Term]) -> list[Term]:
    return [(left, right, -c) for left, right, c in terms]


# --- composing merges ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """After some merges: the exact result, and how far a correct one may be from it."""

    reference: torch.Tensor
    bound: torch.Tensor


Step = Callable[[_State, Sequence[Any]], _State]


def _exact(reference: torch.Tensor, terms: Sequence[Term]) -> torch.Tensor:
    """``R + sum(c * left @ right)`` in float64 (as ``safemerge.bounds.reference_merge``)."""
    merged = reference.clone()
    for left, right, c in terms:
        merged += c * (left.to(torch.float64) @ right.to(torch.float64))
    return merged


def _merged(state: _State, terms: Sequence[Any], step: Step) -> _State:
    """Merge ``terms`` into ``state`` at once or one at a time (in either order): the
    largest bound of the three, which each of them stays within."""
    ways = [step(state, terms)]
    if len(terms) > 1:
        for order in (list(terms), list(terms)[::-1]):
            current = state
            for term in order:
                current = step(current, [term])
            ways.append(current)
    bound = ways[0].bound
    for way in ways[1:]:
        bound = torch.maximum(bound, way.bound)
    return _State(ways[0].reference, bound)


def _half_ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The final cast's rounding (none for float32: its roundings are in ``gamma``)."""
    if dtype == torch.float32:
        return torch.zeros_like(magnitude)
    half: torch.Tensor = ulp(magnitude, dtype) / 2
    return half


def _float_step(dtype: torch.dtype) -> Step:
    """One float32 merge of the terms into a weight of ``dtype``, then its cast."""

    def step(state: _State, terms: Sequence[Any]) -> _State:
        magnitude = state.reference.abs() + state.bound
        # safemerge's float32 accumulation bound, with |W| inflated by what came before.
        _, accumulated, _ = safemerge.merge_bound_parts(magnitude, terms, torch.float32)
        reference = _exact(state.reference, terms)
        before_cast = state.bound + accumulated
        return _State(reference, before_cast + _half_ulp(reference.abs() + before_cast, dtype))

    return step


def _quantized_step(layer: Any) -> Step:
    """One float32 merge into a bitsandbytes layer's weight, then its requantization.

    With ``y`` the float32 merge (within ``slack`` of the exact ``R``) and ``Q`` the
    layer's quantizer, ``|Q(y) - R| <= |Q(y) - y| + slack``. ``|Q(y) - y|`` is bounded
    by the quantizer's bound at ``y``; that bound, computed here at ``R`` rounded to
    float32 by requantizing it with the layer's own settings, moves by at most
    :data:`_QUANTIZER_LIPSCHITZ` times the largest ``|y - fl32(R)|``, plus
    :data:`_QUANTIZER_RELATIVE` of the largest magnitude.
    """

    def step(state: _State, terms: Sequence[Any]) -> _State:
        magnitude = state.reference.abs() + state.bound
        _, accumulated, _ = safemerge.merge_bound_parts(magnitude, terms, torch.float32)
        reference = _exact(state.reference, terms)
        slack = state.bound + accumulated
        _, quantization = safemerge.quantization_bound(layer, reference.float())
        shift = float((slack + U32 * reference.abs()).max())
        moved = _QUANTIZER_LIPSCHITZ * shift + _QUANTIZER_RELATIVE * (
            float(reference.abs().max()) + shift
        )
        return _State(reference, slack + quantization.cpu().to(torch.float64) + moved)

    return step


def _start(layout: _Layout) -> _State:
    return _State(layout.matrix, torch.zeros_like(layout.matrix))


def _expected_weight(layout: _Layout, *, round_trip: bool) -> Expected:
    dora = any(adapter.magnitude is not None for adapter in layout.adapters)
    if layout.quantized:
        step = _quantized_step(layout.layer)
        # An 8-bit layer's merge lands in float16 first; a 4-bit one is requantized from
        # the float32 merge itself.
        limit = range_limit(
            torch.float16 if type(layout.layer).__name__ == "Linear8bitLt" else torch.float32
        )
    else:
        assert layout.dtype is not None
        step = _float_step(layout.dtype)
        limit = range_limit(layout.dtype)
    if layout.quantized:
        fused = _merged(_start(layout), layout.terms, step)
    else:
        fused = _fused_float(layout, step)
    if not round_trip:
        return Expected(
            "weight", fused.reference.reshape(layout.shape), _shaped(fused, layout), limit
        )
    if dora:
        restored = _dora_unfuse(layout, fused, step)
    else:
        restored = _merged(fused, _negated(layout.terms), step)
    original = layout.matrix.reshape(layout.shape)
    return Expected("weight", original, restored.bound.reshape(layout.shape), limit)


def _shaped(state: _State, layout: _Layout) -> torch.Tensor:
    return state.bound.reshape(layout.shape)


def _fused_float(layout: _Layout, step: Step) -> _State:
    """The fuse of an unquantized layer: at once, exactly :func:`safemerge.expected_fuse`'s
    bound (DoRA's too); with several adapters, also one at a time."""
    pairs = [(adapter, 1.0) for adapter in layout.adapters]
    reference, bound = safemerge.expected_fuse(layout.layer, pairs, scale=layout.scale)
    matrix_shape = layout.matrix.shape
    at_once = _State(reference.reshape(matrix_shape), bound.reshape(matrix_shape))
    if len(layout.terms) == 1:
        return at_once
    one_by_one = _merged(_start(layout), layout.terms, step)
    return _State(at_once.reference, torch.maximum(at_once.bound, one_by_one.bound))


def _dora_unfuse(layout: _Layout, fused: _State, step: Step) -> _State:
    """DoRA's arithmetic unfuse: divide the fused weight by the factor ``m / ||W + delta||``
    used at the fuse, then subtract the delta.

    A correct factor ``f'`` is within ``rho' f`` of the exact ``f``, with ``rho'`` the
    factor's relative error as ``safemerge.bounds.renormalised_bound`` counts it (the
    plain merge's error norm over its norm, and float64 sums of squares). Then
    ``|N / f' - P| <= (|N - f P| + |f - f'| |P|) / f' <= (b + rho' f |P|) / (f (1 - rho'))``
    for the fused ``N`` within ``b`` of ``f P`` (``P = W + delta``), plus two float32
    roundings of the quotient (or of a reciprocal and a product).
    """
    (adapter,) = layout.adapters
    assert adapter.magnitude is not None
    plain = _exact(layout.matrix, layout.terms)
    _, accumulated, _ = safemerge.merge_bound_parts(layout.matrix, layout.terms, torch.float32)
    dim = 0 if layout.transposed else 1
    norms = torch.linalg.vector_norm(plain, dim=dim, keepdim=True)
    error_norms = torch.linalg.vector_norm(accumulated, dim=dim, keepdim=True)
    rho = error_norms / (norms - error_norms).clamp_min(0)
    float64_error = (plain.shape[dim] + 2) * 2.0**-52
    relative = (1 + rho) * (1 + float64_error) - 1
    channels = (1, -1) if layout.transposed else (-1, 1)
    factor = adapter.magnitude.detach().cpu().to(torch.float64).abs().reshape(channels) / norms
    numerator = fused.bound + relative * factor * plain.abs()
    numerator = numerator + 2 * U32 * (fused.reference.abs() + fused.bound)
    denominator = factor * (1 - relative)
    divided = torch.where(
        denominator > 0, numerator / denominator, torch.full_like(numerator, float("inf"))
    )
    return step(_State(plain, divided), _negated(layout.terms))


# --- the bias -----------------------------------------------------------------------------------


def _bias_step(dtype: torch.dtype) -> Step:
    """One float32 merge of lora_biases into a bias of ``dtype``, then its cast.

    ``b' = cast(b + sum(c_i * lora_bias_i))`` with ``c_i`` rounded to float32 (its error
    counted exactly, as for the weight), then for ``m`` terms ``m`` products and ``m``
    additions in float32: each term passes through at most ``m + 1`` roundings, and one
    more is spared, as for the weight, so ``gamma_{m+2}`` of the magnitudes involved,
    plus half the smallest subnormal per rounding where results underflow; then half an
    ulp of ``dtype`` for the cast.
    """

    def step(state: _State, terms: Sequence[Any]) -> _State:
        n = len(terms) + 2
        gamma = n * U32 / (1 - n * U32)
        magnitude = state.reference.abs() + state.bound
        reference = state.reference.clone()
        coefficient_error = torch.zeros_like(magnitude)
        for lora_bias, c in terms:
            values = lora_bias.detach().cpu().to(torch.float64).reshape(-1)
            rounded = float(torch.tensor(c, dtype=torch.float32))
            magnitude = magnitude + abs(rounded) * values.abs()
            coefficient_error = coefficient_error + abs(c - rounded) * values.abs()
            reference += c * values
        accumulated = gamma * magnitude + coefficient_error + n * FLOAT32_TINY_SUBNORMAL
        before_cast = state.bound + accumulated
        return _State(reference, before_cast + _half_ulp(reference.abs() + before_cast, dtype))

    return step


def _expected_bias(layout: _Layout, *, round_trip: bool) -> Expected | None:
    bias = getattr(layout.layer, "bias", None)
    terms = [
        (adapter.lora_bias, c)
        for adapter, (_, _, c) in zip(layout.adapters, layout.terms, strict=True)
        if adapter.lora_bias is not None
    ]
    if bias is None or not terms:
        return None
    original = bias.detach().cpu().to(torch.float64).reshape(-1)
    step = _bias_step(bias.dtype)
    start = _State(original, torch.zeros_like(original))
    fused = _merged(start, terms, step)
    limit = range_limit(bias.dtype)
    if not round_trip:
        return Expected("bias", fused.reference, fused.bound, limit)
    restored = _merged(fused, [(lora_bias, -c) for lora_bias, c in terms], step)
    return Expected("bias", original, restored.bound, limit)
