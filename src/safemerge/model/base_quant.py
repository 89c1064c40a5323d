"""Which merge keeps a QLoRA adapter's effect: the three choices, measured per layer.

A QLoRA adapter was trained against the dequantized 4-bit base ``Wq = dequant(quant(W))``
(in the compute dtype), so the output it was trained to give is
``y_ref = (Wq + delta) x``, ``delta = sum_i c_i B_i A_i``. Each way of shipping it is off
from ``y_ref`` by something, measured against the adapter's own effect ``delta x`` on the
same seeded random inputs ``x``:

- ``16bit``: ``cast(W + delta)``, the plain merge into the original weights: off by
  ``(W - Wq) x``, the quantization error the adapter learned to live with;
- ``16bit_dequantized``: ``cast(Wq + delta)``, the QLoRA-faithful merge: off by the
  16-bit rounding only;
- ``quantized``: ``quant(Wq + delta)``, the requantized merge into the 4-bit base:
  off by the requantization, which can swallow a small delta whole (a block unchanged).

``output_error = ||y_choice - y_ref|| / ||delta x||``: 0 keeps the adapter's effect
exactly, 1 loses as much as the whole effect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from safemerge.merge.adapter import LoraAdapter
from safemerge.merge.request import coefficients as coefficients_of

#: Random inputs the output errors are measured on (seeded: the same for every run).
INPUTS = 16
#: The choices, in the order tables show them.
CHOICES = ("16bit", "16bit_dequantized", "quantized")

#: A layer's comparison as plain JSON fields (``TensorResult.qlora``).
Fields = Mapping[str, float | int | str | None]


@dataclass(frozen=True)
class QloraComparison:
    """One adapted layer's three choices against the output its adapter was trained for.

    Attributes:
        reference: the quantization the adapter was trained against (``"nf4/64/nested"``).
        written: the choice written to the output (one of :data:`CHOICES`).
        effect_norm: ``||delta x||`` over the random inputs.
        errors: per choice, ``||y_choice - y_ref||`` (absolute; divide by ``effect_norm``).
        blocks: the quantized weight's blocks (4-bit absmax blocks, int8 rows).
        blocks_unchanged: blocks the requantized merge left exactly as in the 4-bit base.
    """

    reference: str
    written: str
    effect_norm: float
    errors: Mapping[str, float]
    blocks: int
    blocks_unchanged: int

    def output_error(self, choice: str) -> float:
        return _ratio(self.errors[choice], self.effect_norm)

    def fields(self) -> dict[str, float | int | str | None]:
        """Plain per-layer fields for ``fuse --json``: ``output_error`` and
        ``adapter_effect_kept`` (``max(0, 1 - output_error)``) of the written choice,
        ``output_error_<choice>`` of each, ``blocks``, ``blocks_unchanged``,
        ``qlora_reference``, ``written_choice``, ``adapter_effect_norm``."""
        written_error = self.output_error(self.written)
        return {
            "qlora_reference": self.reference,
            "written_choice": self.written,
            "output_error": written_error,
            "adapter_effect_kept": max(0.0, 1.0 - written_error),
            **{f"output_error_{choice}": self.output_error(choice) for choice in CHOICES},
            "blocks": self.blocks,
            "blocks_unchanged": self.blocks_unchanged,
            "adapter_effect_norm": self.effect_norm,
        }


def compare(
    reference: torch.Tensor,
    pairs: Sequence[tuple[LoraAdapter, float]],
    scale: float,
    choices: Mapping[str, torch.Tensor],
    *,
    reference_name: str,
    written: str,
    blocks: int,
    blocks_unchanged: int,
) -> QloraComparison:
    """Measure each choice's merged weight against ``y_ref``.

    Args:
        reference: ``Wq``, the dequantized base the adapter was trained against.
        pairs, scale: the adapters and their weights, as fused.
        choices: each choice's merged weight, ``(out, in)`` values (any float dtype).
        reference_name, written, blocks, blocks_unchanged: see :class:`QloraComparison`.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(INPUTS, reference.shape[1], generator=generator, dtype=torch.float64)
    effect = torch.zeros(INPUTS, reference.shape[0], dtype=torch.float64)
    for (adapter, _), coefficient in zip(pairs, coefficients_of(pairs, scale), strict=True):
        projected = inputs @ adapter.lora_A.detach().to(torch.float64).T
        effect += coefficient * (projected @ adapter.lora_B.detach().to(torch.float64).T)
    trained_for = inputs @ reference.to(torch.float64).T + effect
    errors = {
        choice: float(torch.linalg.vector_norm(inputs @ merged.to(torch.float64).T - trained_for))
        for choice, merged in choices.items()
    }
    return QloraComparison(
        reference=reference_name,
        written=written,
        effect_norm=float(torch.linalg.vector_norm(effect)),
        errors=errors,
        blocks=blocks,
        blocks_unchanged=blocks_unchanged,
    )


def overall(layers: Iterable[Fields]) -> dict[str, float | int]:
    """The whole model's numbers from its layers' fields: each output error as the root
    sum of squares of the layers' errors over that of their effects, blocks summed."""
    rows = list(layers)
    total_effect = math.sqrt(sum(float(row["adapter_effect_norm"] or 0.0) ** 2 for row in rows))
    result: dict[str, float | int] = {}
    for key in ("output_error", *(f"output_error_{choice}" for choice in CHOICES)):
        squared = sum(
            (float(row[key] or 0.0) * float(row["adapter_effect_norm"] or 0.0)) ** 2 for row in rows
        )
        result[key] = _ratio(math.sqrt(squared), total_effect)
    result["adapter_effect_kept"] = max(0.0, 1.0 - result["output_error"])
    result["blocks"] = sum(int(row["blocks"] or 0) for row in rows)
    result["blocks_unchanged"] = sum(int(row["blocks_unchanged"] or 0) for row in rows)
    return result


def summary(layers: Sequence[tuple[str, Fields]]) -> str:
    """The comparison as a table for the command line: per layer and overall."""
    header = ("layer", "written", *(f"err {choice}" for choice in CHOICES), "blocks unchanged")
    rows = [header]
    for name, row in [*layers, ("overall", {**overall(fields for _, fields in layers),
                                            "written_choice": ""})]:  # fmt: skip
        rows.append(
            (
                name,
                str(row.get("written_choice", "")),
                *(f"{float(row[f'output_error_{choice}'] or 0.0):.4f}" for choice in CHOICES),
                f"{row['blocks_unchanged']:,} of {row['blocks']:,}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    reference = layers[0][1]["qlora_reference"] if layers else "?"
    return "\n".join(
        [
            f"QLoRA choices against the output the adapter was trained for ({reference} base): "
            f"output error = ||y - y_ref|| / ||adapter effect|| on {INPUTS} random inputs",
            *lines,
        ]
    )


def _ratio(error: float, effect: float) -> float:
    if effect > 0:
        return error / effect
    return 0.0 if error == 0 else math.inf
