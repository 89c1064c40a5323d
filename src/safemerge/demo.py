"""A built-in demonstration: fuse a LoRA adapter into a tiny generated model, safely.

It needs nothing downloaded: the model and the adapter are generated from a seed. It
shows the three things safemerge is for: an accurate guarded fuse (worst error as a
fraction of its bound), a broken adapter refused with nothing changed, and an exact
unfuse (every bit back) at the cost of a small correction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from safemerge.adapter import LoraAdapter
from safemerge.errors import NonFiniteMergeError
from safemerge.fuse import fuse, unfuse
from safemerge.layers import view_layer
from safemerge.numerics import int_view
from safemerge.reference import expected_fuse


def tiny_model(dtype: torch.dtype = torch.bfloat16, *, seed: int = 0) -> dict[str, nn.Module]:
    """A two-block, Llama-shaped toy: attention and MLP projections, embeddings, a conv stem."""
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, nn.Module] = {
        "embed_tokens": nn.Embedding(512, 64),
        "stem.conv": nn.Conv2d(3, 64, 3),
    }
    for block in range(2):
        for name, (in_features, out_features) in {
            "q_proj": (64, 64),
            "k_proj": (64, 16),
            "v_proj": (64, 16),
            "o_proj": (64, 64),
            "gate_proj": (64, 172),
            "up_proj": (64, 172),
            "down_proj": (172, 64),
        }.items():
            layers[f"layers.{block}.{name}"] = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        for layer in layers.values():
            for parameter in layer.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            layer.to(dtype)
    return layers


def tiny_adapter(layer: nn.Module, *, rank: int = 8, seed: int = 0) -> LoraAdapter:
    """A random, well-behaved LoRA adapter that fits ``layer``."""
    view = view_layer(layer)
    generator = torch.Generator().manual_seed(seed)
    kernel = view.kernel_size
    lora_A = (
        torch.randn(rank, view.in_features, *kernel, generator=generator) / view.in_features**0.5
    )
    lora_B = torch.randn(view.out_features, rank, *(1 for _ in kernel), generator=generator) * 1e-2
    return LoraAdapter(lora_A, lora_B, alpha=2 * rank)


@dataclass(frozen=True)
class DemoRow:
    layer: str
    kind: str
    parameters: int
    worst_error_of_bound: float
    correction_fraction: float
    exact: bool


def run_demo(dtype: torch.dtype = torch.bfloat16, *, echo: Callable[[str], None] = print) -> bool:
    """Run the demonstration; returns True when every check held."""
    model = tiny_model(dtype)
    rows: list[DemoRow] = []
    for name, layer in model.items():
        weight = view_layer(layer, name).weight
        adapter = tiny_adapter(layer, seed=len(rows))
        original = int_view(weight.detach().clone())
        reference, bound = expected_fuse(layer, [(adapter, 1.0)])
        record = fuse(layer, adapter, name=name)
        error = (weight.detach().to(torch.float64) - reference).abs()
        worst = float((error / bound).max())
        unfuse(layer, record)
        exact = torch.equal(int_view(weight.detach()), original)
        rows.append(
            DemoRow(
                name,
                record.kind,
                weight.numel(),
                worst,
                record.nbytes / record.weight_nbytes,
                exact,
            )
        )
    echo(
        f"safemerge demo: fused a rank-8 LoRA adapter into {len(rows)} layers of a tiny "
        f"{str(dtype).removeprefix('torch.')} model, then unfused it exactly.\n"
    )
    echo(_table(rows))
    refused = _refusal_demo(model, dtype, echo)
    healthy = all(row.exact and row.worst_error_of_bound <= 1.0 for row in rows)
    echo("\nresult: " + ("all checks held" if healthy and refused else "A CHECK FAILED"))
    return healthy and refused


def _refusal_demo(
    model: dict[str, nn.Module], dtype: torch.dtype, echo: Callable[[str], None]
) -> bool:
    layer = model["layers.1.down_proj"]
    weight = view_layer(layer).weight
    adapter = tiny_adapter(layer, seed=99)
    adapter.lora_B[-1, -1] = float("nan")  # a training blow-up in the very last element
    before = int_view(weight.detach().clone())
    echo("\nA broken adapter (one NaN in lora_B) is refused, and the layer is left as it was:")
    try:
        fuse(layer, adapter, name="layers.1.down_proj")
    except NonFiniteMergeError as error:
        echo(f"  NonFiniteMergeError: {error}")
        return torch.equal(int_view(weight.detach()), before)
    echo("  it was NOT refused")
    return False


def _table(rows: list[DemoRow]) -> str:
    header = ("layer", "kind", "params", "worst err/bound", "correction", "exact unfuse")
    lines = [header] + [
        (
            row.layer,
            row.kind,
            f"{row.parameters:,}",
            f"{row.worst_error_of_bound:.3f}",
            f"{row.correction_fraction:.1%} of weight",
            "yes" if row.exact else "NO",
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    )
