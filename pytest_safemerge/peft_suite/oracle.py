"""The model contract's oracle: what PEFT's entry points must leave in each layer, and how
far its forward may be from the exact one, in float64 and outside PEFT.

The merged weight of a layer is ``W + sum(s_i * B_i @ A_i)`` with each adapter's scale
``s_i`` read from the drawn config (``alpha / r``, ``alpha / sqrt(r)`` with rsLoRA,
``rank_pattern`` and ``alpha_pattern`` for ``layer``), not from PEFT; a DoRA adapter's
is ``m / ||W + s B A|| * (W + s B A)``, norms per output channel, as PEFT defines DoRA.
References and per-element bounds come from :func:`pytest_safemerge.layer_bounds
.expected_layer_fuse` (a float32 merge and its roundings, one adapter at a time or all at
once), fed with the adapters' tensors as PEFT holds them.

The forward of one module is ``y = op(x, W) + b`` (a matmul, a convolution or a lookup).
Computed in the weight's dtype with unit roundoff ``u``, a reduction of ``k`` products
plus the bias and the output's cast stays within ``gamma_{k+3}(u) * op(|x|, |W|) + |b|``
of the exact result (Higham, 3.5); a merged weight within ``e`` of the reference adds
``op(|x|, e)``. Unmerged, PEFT computes ``op(x, W) + b + s * B(A(x))``, each part within
``gamma_{k+r+6}(u)`` of its magnitudes (the chain ``A`` then ``B``, the scale, the sum
and casts); DoRA computes ``(f - 1) * base + f * s * lora`` with ``f = m / ||W + sBA||``,
so its magnitudes grow by ``1 + |f - 1| + 2|f|`` (the factor's own relative error, a few
float32 roundings of a norm, is below ``gamma`` of the dtype's ``u``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import safemerge
from pytest_safemerge.layer_bounds import LayerExpectation, expected_layer_fuse
from pytest_safemerge.peft_suite.configs import AdapterSpec, adapter_tensors

__all__ = [
    "Original",
    "forward_bounds",
    "layer_expectation",
    "original_of",
    "plain_tensors",
    "written",
]

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def module_key(name: str) -> str:
    """The config key of a LoRA layer: ``layer`` for the kind under test (and the
    out_proj a MultiheadAttention carries), ``first`` otherwise."""
    return "layer" if name.startswith("layer") else "first"


def written(layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What PEFT's merge writes in a LoRA layer: the base weight and bias (a
    MultiheadAttention's in_proj_weight and in_proj_bias; None where there is none)."""
    return plain_tensors(layer.get_base_layer())


def plain_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plain module's weight and bias, as :func:`written` reads them."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight, module.in_proj_bias
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    bias = getattr(module, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


@dataclass(frozen=True)
class Original:
    """A layer's weight and bias before any merge, and a float stand-in of its base
    module holding them (a MultiheadAttention's in_proj as an ``nn.Linear``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    module: nn.Module
    transposed: bool  # output channels are the weight's columns (Embedding, Conv1D)


def original_of(layer: Any) -> Original:
    weight, bias = (t.detach().clone() if t is not None else None for t in written(layer))
    assert weight is not None
    base = layer.get_base_layer()
    if isinstance(base, nn.MultiheadAttention):
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        module = copy.deepcopy(base)
    with torch.no_grad():
        module.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias.clone(), requires_grad=False)
    transposed = isinstance(base, nn.Embedding) or bool(getattr(layer, "fan_in_fan_out", False))
    return Original(weight, bias, module, transposed)


def scaled_adapter(
    layer: Any, spec: AdapterSpec, name: str, coefficient: float | None = None
) -> safemerge.LoraAdapter:
    """The adapter ``spec`` names as ``layer`` holds it, scaled as its config says (its
    rank checked against the config), or by ``coefficient`` when given."""
    key = module_key(name)
    tensors = {k: v.detach().clone() for k, v in adapter_tensors(layer, spec.name).items()}
    rank = int(tensors["A"].shape[0])
    rslora = "rslora" in spec.options
    if coefficient is None:
        if rank != spec.rank(key):
            raise AssertionError(
                f"PEFT built adapter {spec.name!r} on {name} with rank {rank}; its config says "
                f"{spec.rank(key)} (rank_pattern {spec.pattern_r or 'none'})"
            )
        alpha = spec.alpha_of(key)
    else:
        alpha = coefficient * (rank**0.5 if rslora else rank)
    return safemerge.LoraAdapter(
        tensors["A"],
        tensors["B"],
        alpha,
        use_rslora=rslora,
        lora_bias=tensors.get("bias"),
        magnitude=tensors.get("magnitude"),
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
    )


def delta_magnitude(adapter: safemerge.LoraAdapter, original: Original) -> torch.Tensor:
    """``|s| |B| @ |A|`` in the weight's shape, float64."""
    return abs(adapter.scale) * _full_delta(
        adapter, original.weight, original.transposed, signed=False
    )


def layer_expectation(
    layer: Any, name: str, specs: Sequence[AdapterSpec], original: Original
) -> LayerExpectation:
    """What merging ``specs`` (their adapters as ``layer`` holds them) into the original
    layer must give: float64 references and per-element bounds."""
    adapters = [scaled_adapter(layer, spec, name) for spec in specs]
    return expected_layer_fuse(original.module, adapters, 1.0)


def scales(specs: Sequence[AdapterSpec], key: str, ranks: Sequence[int]) -> list[float]:
    return [
        spec.alpha_of(key) / (rank**0.5 if "rslora" in spec.options else rank)
        for spec, rank in zip(specs, ranks, strict=True)
    ]


# --- the forward --------------------------------------------------------------------------------


def _apply(
    module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``module``'s operation in float64 with the given weight and bias."""
    twin = copy.deepcopy(module).to(torch.float64)
    with torch.no_grad():
        twin.weight = nn.Parameter(weight.to(torch.float64), requires_grad=False)
        if bias is not None:
            twin.bias = nn.Parameter(bias.to(torch.float64), requires_grad=False)
        elif isinstance(own := getattr(twin, "bias", None), torch.Tensor):
            twin.bias = nn.Parameter(torch.zeros_like(own), requires_grad=False)
        inputs = x if not x.is_floating_point() else x.to(torch.float64)
        out: torch.Tensor = twin(inputs)
    return out


def _full_delta(
    adapter: safemerge.LoraAdapter, weight: torch.Tensor, transposed: bool, signed: bool
) -> torch.Tensor:
    """``B @ A`` (or ``|B| @ |A|``) in the weight's own shape, float64."""
    a = adapter.lora_A.to(torch.float64).flatten(1)
    b = adapter.lora_B.to(torch.float64).flatten(1)
    product = b @ a if signed else b.abs() @ a.abs()
    return (product.T if transposed else product).reshape(weight.shape)


@dataclass(frozen=True)
class ForwardBounds:
    """The exact output of one module, and how far the merged and the unmerged forward
    may each be from it."""

    exact: torch.Tensor
    merged: torch.Tensor
    unmerged: torch.Tensor


def forward_bounds(
    layer: Any,
    name: str,
    specs: Sequence[AdapterSpec],
    original: Original,
    expectation: LayerExpectation,
    x: torch.Tensor,
) -> ForwardBounds:
    key = module_key(name)
    adapters = [scaled_adapter(layer, spec, name) for spec in specs]
    weight = original.weight.to(torch.float64)
    bias = original.bias.to(torch.float64) if original.bias is not None else None
    u = _UNIT_ROUNDOFF[original.weight.dtype]
    reduction = weight.numel() // weight.shape[1 if original.transposed else 0]
    if isinstance(original.module, nn.Embedding):
        reduction = 1
    module = original.module
    bias_ref = expectation.bias.reference if expectation.bias is not None else bias
    bias_bound = expectation.bias.bound if expectation.bias is not None else None
    exact = _apply(module, x, expectation.weight.reference, bias_ref)
    magnitude_x = x if not x.is_floating_point() else x.abs()
    w_bound = expectation.weight.bound
    merged = _apply(module, magnitude_x, w_bound, bias_bound) + _gamma(reduction + 3, u) * _apply(
        module,
        magnitude_x,
        expectation.weight.reference.abs() + w_bound,
        None
        if bias_ref is None
        else bias_ref.abs() + (bias_bound if bias_bound is not None else 0),
    )
    coefficients = scales(specs, key, [int(a.lora_A.shape[0]) for a in adapters])
    magnitude_w = weight.abs()
    magnitude_b = bias.abs() if bias is not None else None
    growth = torch.ones(())
    for adapter, c in zip(adapters, coefficients, strict=True):
        magnitude_w = magnitude_w + abs(c) * _full_delta(
            adapter, weight, original.transposed, signed=False
        )
        if adapter.lora_bias is not None and magnitude_b is not None:
            magnitude_b = magnitude_b + abs(c) * adapter.lora_bias.to(torch.float64).abs()
        if adapter.magnitude is not None:
            growth = _dora_growth(adapter, weight, c, original.transposed)
    most_rank = max(int(a.lora_A.shape[0]) for a in adapters)
    unmerged = _gamma(reduction + most_rank + 6, u) * _apply(
        module, magnitude_x, magnitude_w, magnitude_b
    )
    if growth.dim():
        unmerged = unmerged * _channels_last(growth, unmerged, module)
    return ForwardBounds(exact, merged, unmerged)


def _gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n`` for unit roundoff ``u``."""
    return n * u / (1 - n * u)


def _dora_growth(
    adapter: safemerge.LoraAdapter, weight: torch.Tensor, c: float, transposed: bool
) -> torch.Tensor:
    """``1 + |f - 1| + 2|f|`` per output channel, ``f = |m| / ||W + c B A||``."""
    assert adapter.magnitude is not None
    plain = weight + c * _full_delta(adapter, weight, transposed, signed=True)
    flat = plain.T if transposed else plain.reshape(plain.shape[0], -1)
    f = adapter.magnitude.to(torch.float64).abs().reshape(-1) / torch.linalg.vector_norm(
        flat, dim=1
    )
    growth: torch.Tensor = 1 + (f - 1).abs() + 2 * f
    return growth


def _channels_last(growth: torch.Tensor, output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The per-channel factor shaped to broadcast over the module's output (channels
    second for a convolution, last otherwise)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return growth.reshape(1, -1, *([1] * (output.dim() - 2)))
    return growth
