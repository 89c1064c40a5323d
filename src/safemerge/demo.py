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

from safemerge.errors import NonFiniteMergeError
from safemerge.layer import fuse, unfuse
from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.numerics import int_view
from safemerge.merge.reference import expected_fuse
from safemerge.merge.view import view_layer
from safemerge.synthetic import random_adapter, tiny_model


def tiny_adapter(layer: nn.Module, *, seed: int = 0) -> LoraAdapter:
    """A rank-8 adapter (alpha 16) whose delta is small next to the tiny model's weights."""
    return random_adapter(layer, rank=8, alpha=16, std=1e-2, seed=seed)


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
