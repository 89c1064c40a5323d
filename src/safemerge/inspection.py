"""Scanning an adapter before anything is merged: its format, ranks, alphas and
non-finite values, and, given a base model, which layers would not survive the merge in
the target dtype. Nothing is written and nothing is kept beyond one layer at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from safemerge.errors import NonFiniteMergeError, SafemergeError
from safemerge.io.adapter_formats import load_adapter, read_raw_adapter
from safemerge.io.checkpoint import open_checkpoint
from safemerge.layer import fuse_weight
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.view import matrix_form


@dataclass
class LayerScan:
    """One adapter layer as the scan found it.

    Attributes:
        name: the layer's name in the adapter file (its key stem).
        module: its module path, as it is matched to the base's weight names.
        rank, alpha, scale: the LoRA rank, alpha, and ``alpha / rank`` (or ``/ sqrt(rank)``).
        non_finite: per tensor ("lora_A", "lora_B", ...), how many NaN, +Inf, -Inf it holds.
        base_weight: the base weight it maps to (with a base).
        merge: "ok", "refused" (the merge is not finite in the dtype), or "not checked".
        merge_detail: for a refused merge, the counts and the first index.
    """

    name: str
    module: str
    rank: int
    alpha: float
    scale: float
    shapes: dict[str, list[int]]
    non_finite: dict[str, dict[str, int]] = field(default_factory=dict)
    base_weight: str | None = None
    merge: str = "not checked"
    merge_detail: str = ""

    @property
    def safe(self) -> bool:
        return not self.non_finite and self.merge != "refused"


@dataclass
class AdapterScan:
    """What :func:`inspect_adapter` found; ``safe`` is False when merging would fail."""

    path: str
    format: str
    digest: str
    layers: list[LayerScan]
    base: str | None = None
    dtype: str | None = None
    scale: float = 1.0
    problems: list[str] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not self.problems and all(layer.safe for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["safe"] = self.safe
        for layer, data in zip(self.layers, document["layers"], strict=True):
            data["safe"] = layer.safe
        return document


def inspect_adapter(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> AdapterScan:
    """Scan an adapter, and with ``base`` check each layer's merge in ``dtype`` (default:
    each base weight's own dtype) at the overall ``scale``.

    Raises:
        CheckpointError, AdapterConfigError: the adapter (or base) cannot be read at all.
    """
    raw = read_raw_adapter(path)
    layers = [_scan_layer(layer) for layer in raw.parsed.layers]
    scan = AdapterScan(
        str(raw.path),
        raw.format,
        raw.digest,
        layers,
        base=None if base is None else str(base),
        dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        scale=scale,
        problems=[f"{key}: {reason}" for key, reason in raw.parsed.problems],
    )
    if base is not None:
        _check_against_base(scan, Path(base), dtype, scale, progress)
    return scan


def _scan_layer(raw: Any) -> LayerScan:
    lora_A = raw.tensors["A"][1]
    rank = int(lora_A.shape[0])
    alpha = float(raw.alpha) if raw.alpha is not None else float(rank)
    scale = alpha / (math.sqrt(rank) if raw.use_rslora else rank)
    shapes = {role: list(tensor.shape) for role, (_, tensor) in raw.tensors.items()}
    scan = LayerScan(raw.label, raw.module, rank, alpha, scale, shapes)
    for key, tensor in raw.tensors.values():
        counts = _non_finite_counts(tensor)
        if counts:
            scan.non_finite[key] = counts
    return scan


def _non_finite_counts(tensor: torch.Tensor) -> dict[str, int]:
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return {}
    counts = {
        "nan": int(torch.isnan(tensor).sum()),
        "+inf": int(torch.isposinf(tensor).sum()),
        "-inf": int(torch.isneginf(tensor).sum()),
    }
    return {name: count for name, count in counts.items() if count}


def _check_against_base(
    scan: AdapterScan,
    base: Path,
    dtype: torch.dtype | None,
    scale: float,
    progress: Callable[[str], None] | None,
) -> None:
    with open_checkpoint(base) as checkpoint:
        try:
            adapters = load_adapter(scan.path, base=checkpoint)
        except SafemergeError as error:
            scan.problems.append(str(error))
            return
        by_source = {source: name for name, source in adapters.sources.items()}
        for layer in scan.layers:
            weight_name = by_source.get(layer.module)
            if weight_name is None:
                continue
            layer.base_weight = weight_name
            if progress is not None:
                progress(weight_name)
            adapter = adapters.layers[weight_name]
            if adapter.is_dora:
                layer.merge_detail = "DoRA: renormalised per channel, checked by fuse only"
                continue
            weight = checkpoint.read(weight_name)
            if dtype is not None:
                weight = weight.to(dtype)
            _check_merge(layer, weight, adapter, adapters.kinds[weight_name], scale)


def _check_merge(
    layer: LayerScan, weight: torch.Tensor, adapter: LoraAdapter, kind: str, scale: float
) -> None:
    if adapter.fan_in_fan_out:
        kind = "fan_in_fan_out"
    matrix, lora_A, lora_B = matrix_form(weight, adapter.lora_A, adapter.lora_B, kind)
    plain = LoraAdapter(lora_A, lora_B)
    try:
        fuse_weight(matrix, plain, scale=adapter.scale * scale, name=layer.name, exact_unfuse=False)
    except NonFiniteMergeError as error:
        layer.merge = "refused"
        layer.merge_detail = (
            f"{error.nan_count} NaN, {error.posinf_count} +Inf, {error.neginf_count} -Inf, "
            f"{error.overflow_count} beyond {str(error.dtype).removeprefix('torch.')}'s range, "
            f"of {error.numel}; first at {error.first_index}"
        )
        return
    layer.merge = "ok"
