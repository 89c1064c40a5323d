"""diffusers' legacy LoRA fuse (``diffusers.models.lora``, deprecated but still shipped), in
the contracts of safemerge's conformance suite.

``pytest --safemerge-impl=pytest_safemerge.targets.diffusers:DIFFUSERS_LEGACY`` runs the
suite against ``LoRACompatibleLinear`` and ``LoRACompatibleConv``: the layer under test is
given to diffusers as one of them sharing its weight and bias Parameters (the same
objects, so that diffusers, swapping their ``.data``, writes the layer), the adapter as a
``LoRALinearLayer`` / ``LoRAConv2dLayer`` holding its tensors as they are, and
``_fuse_lora(lora_scale=scale, safe_fusing=True)`` / ``_unfuse_lora()`` do the work.
Nothing here corrects diffusers: what it gets wrong, the suite sees.

Those classes hold one adapter, without ``lora_bias`` or DoRA, and scale it by
``network_alpha / rank``: an adapter's alpha is given as ``network_alpha`` (an rsLoRA
adapter's as ``alpha * sqrt(rank)``, what a converter to this format writes, so that
``network_alpha / rank`` is its scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pytest_safemerge.targets.diffusers_support import import_diffusers, quiet
from pytest_safemerge.targets.identity import ByIdentity
from safemerge.merge.adapter import LoraAdapter

__all__ = ["DIFFUSERS_LEGACY", "LEGACY_LAYER_KINDS", "DiffusersLegacyFuse", "legacy_layer"]

#: The legacy classes: ``LoRACompatibleLinear`` (``nn.Linear``) and ``LoRACompatibleConv``
#: (``nn.Conv2d``), one adapter each, no options.
LEGACY_LAYER_KINDS = frozenset({"linear", "conv2d"})
#: The weight dtypes diffusers' models run in.
DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def network_alpha(adapter: LoraAdapter) -> float | None:
    """The ``network_alpha`` whose ratio to the rank is the adapter's scale (None: scale 1,
    as the legacy layers take an adapter without one)."""
    if adapter.use_rslora:
        alpha = float(adapter.rank if adapter.alpha is None else adapter.alpha)
        return alpha * math.sqrt(adapter.rank)
    return None if adapter.alpha is None else float(adapter.alpha)


def legacy_layer(layer: nn.Module, adapter: LoraAdapter) -> Any:
    """diffusers' ``LoRACompatibleLinear`` or ``LoRACompatibleConv`` sharing ``layer``'s
    weight and bias Parameters, holding ``adapter`` as its LoRA layer.

    Raises:
        TypeError: ``layer`` is neither an ``nn.Linear`` nor an ``nn.Conv2d``, or the
            adapter has what the legacy layers cannot hold (``lora_bias``, DoRA, a
            transposed weight).
    """
    if adapter.lora_bias is not None or adapter.is_dora or adapter.fan_in_fan_out:
        raise TypeError(
            "diffusers' legacy LoRA layers hold a plain LoRA only (no lora_bias, DoRA or "
            "fan_in_fan_out)"
        )
    lora = import_diffusers("diffusers.models.lora")
    bias = getattr(layer, "bias", None)
    shell: Any
    with quiet():
        if type(layer) is nn.Linear:
            shell = lora.LoRACompatibleLinear(
                layer.in_features, layer.out_features, bias=bias is not None, device="meta"
            )
            lora_layer = lora.LoRALinearLayer(
                layer.in_features,
                layer.out_features,
                rank=adapter.rank,
                network_alpha=network_alpha(adapter),
                device="meta",
            )
        elif type(layer) is nn.Conv2d:
            shell = lora.LoRACompatibleConv(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
                bias=bias is not None,
                padding_mode=layer.padding_mode,
                device="meta",
            )
            lora_layer = lora.LoRAConv2dLayer(
                layer.in_channels,
                layer.out_channels,
                rank=adapter.rank,
                kernel_size=layer.kernel_size,
                network_alpha=network_alpha(adapter),
            ).to("meta")
        else:
            raise TypeError(f"diffusers has no legacy LoRA layer for a {type(layer).__name__}")
        shell.set_lora_layer(lora_layer)
    shell.weight = layer.weight
    shell.bias = bias
    lora_layer.down.weight = nn.Parameter(adapter.lora_A.detach(), requires_grad=False)
    lora_layer.up.weight = nn.Parameter(adapter.lora_B.detach(), requires_grad=False)
    return shell


class DiffusersLegacyFuse:
    """diffusers' legacy ``_fuse_lora(safe_fusing=True)`` / ``_unfuse_lora()`` as an
    implementation under test.

    Stateful only to find, at unfuse time, the legacy layer that fused: it keeps the
    factors and the scale it fused with, and ``_unfuse_lora`` subtracts them.
    """

    #: ``_unfuse_lora`` subtracts the delta again: not bit-exact.
    exact_unfuse = False
    layer_kinds = LEGACY_LAYER_KINDS
    dtypes = DTYPES

    def __init__(self) -> None:
        self._weights: ByIdentity[torch.Tensor, tuple[Any, torch.Tensor, torch.Tensor]]
        self._weights = ByIdentity()
        self._layers: ByIdentity[nn.Module, tuple[Any, tuple[LoraAdapter, ...]]]
        self._layers = ByIdentity()

    # The tensor contract.

    def fuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``weight + scale * lora_B @ lora_A`` by ``LoRACompatibleLinear._fuse_lora``.

        Returns:
            The merged weight: a new tensor (diffusers swaps the Parameter's data).

        Raises:
            ValueError: diffusers refused the fuse (it found a NaN in the result).
        """
        shell = legacy_layer(_linear_around(weight), LoraAdapter(lora_A, lora_B))
        with quiet(), torch.no_grad():
            shell._fuse_lora(lora_scale=scale, safe_fusing=True)
        merged: torch.Tensor = shell.weight.detach()
        self._weights.put(merged, (shell, lora_A, lora_B))
        return merged

    def unfuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``_unfuse_lora()`` on the layer whose fuse returned ``weight``, or on a new one
        around ``weight`` holding the factors and scale as ``_fuse_lora`` leaves them.

        Returns:
            The unfused weight (a new tensor, swapped into the Parameter).
        """
        known = self._weights.get(weight)
        if known is not None and known[1] is lora_A and known[2] is lora_B:
            shell = known[0]
            self._weights.pop(weight)
        else:
            shell = _marked_fused(_linear_around(weight), LoraAdapter(lora_A, lora_B), scale)
        with quiet(), torch.no_grad():
            shell._unfuse_lora()
        unfused: torch.Tensor = shell.weight.detach()
        return unfused

    # The module-level contract.

    def fuse_layer(self, layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> None:
        """Fuse the adapter into ``layer`` by its legacy LoRA layer's ``_fuse_lora``.

        Raises:
            ValueError: diffusers refused the fuse.
            TypeError: not one adapter, or a layer or adapter the legacy classes lack.
        """
        adapters = tuple(adapters)
        shell = legacy_layer(layer, _only(adapters))
        with quiet(), torch.no_grad():
            shell._fuse_lora(lora_scale=scale, safe_fusing=True)
        # The shell holds the layer's Parameters, not the layer: no cycle through the map.
        self._layers.put(layer, (shell, adapters))

    def unfuse_layer(self, layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> None:
        """``_unfuse_lora()`` on the legacy layer :meth:`fuse_layer` fused ``layer`` with,
        or on a new one holding the adapter as ``_fuse_lora`` leaves it."""
        adapters = tuple(adapters)
        known = self._layers.get(layer)
        if known is not None and _same(known[1], adapters):
            shell = known[0]
            self._layers.pop(layer)
        else:
            shell = _marked_fused(layer, _only(adapters), scale)
        with quiet(), torch.no_grad():
            shell._unfuse_lora()


#: The implementation under test:
#: ``--safemerge-impl=pytest_safemerge.targets.diffusers:DIFFUSERS_LEGACY``.
DIFFUSERS_LEGACY = DiffusersLegacyFuse()


def _only(adapters: Sequence[LoraAdapter]) -> LoraAdapter:
    if len(adapters) != 1:
        raise TypeError(f"diffusers' legacy LoRA layers hold one adapter, not {len(adapters)}")
    return adapters[0]


def _same(first: Sequence[LoraAdapter], second: Sequence[LoraAdapter]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))


def _linear_around(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight Parameter wraps ``weight`` (same storage)."""
    out_features, in_features = (int(size) for size in weight.shape)
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def _marked_fused(layer: nn.Module, adapter: LoraAdapter, scale: float) -> Any:
    """A legacy layer around ``layer`` as ``_fuse_lora(lora_scale=scale)`` leaves one whose
    weight holds ``adapter`` already: the LoRA layer dropped, the float32 factors (``up``
    scaled by ``network_alpha / rank``) and the scale kept for ``_unfuse_lora``."""
    shell = legacy_layer(layer, adapter)
    lora_layer = shell.lora_layer
    w_up = lora_layer.up.weight.data.float()
    if lora_layer.network_alpha is not None:
        w_up = w_up * lora_layer.network_alpha / lora_layer.rank
    shell.w_up, shell.w_down = w_up, lora_layer.down.weight.data.float()
    shell._lora_scale = scale
    shell.lora_layer = None
    return shell
