"""Hand-written layer cases from bugs that merge code has had, run first by every property.

Generated cases find these too, but not on every draw: each one pins a corner down with
a few numbers (a two-element bias that a guard without ``.all()`` chokes on, a lora_bias
whose scale is not 1, a float16 bias pushed just past 65504, a non-square DoRA layer,
4-bit rows of whole blocks, bfloat16 adapters on a float32 layer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection

import torch
from torch import nn

import safemerge
from pytest_safemerge.layer_strategies import LayerCase
from safemerge import synthetic


def _linear(weight: list[list[float]], bias: list[float] | None, dtype: torch.dtype) -> nn.Linear:
    values = torch.tensor(weight)
    layer = nn.Linear(values.shape[1], values.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(values)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    return layer.to(dtype)


def _adapter(
    lora_A: list[list[float]],
    lora_B: list[list[float]],
    *,
    alpha: float | None = None,
    use_rslora: bool = False,
    lora_bias: list[float] | None = None,
    magnitude: list[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> safemerge.LoraAdapter:
    """An adapter whose tensors hold these values in ``dtype`` (each exact in it)."""

    def exact(values: list[float] | list[list[float]]) -> torch.Tensor:
        tensor, wanted = torch.tensor(values, dtype=dtype), torch.tensor(values).double()
        assert bool(((tensor.double() == wanted) | wanted.isnan()).all()), (values, dtype)
        return tensor

    return safemerge.LoraAdapter(
        exact(lora_A),
        exact(lora_B),
        alpha=alpha,
        use_rslora=use_rslora,
        lora_bias=None if lora_bias is None else exact(lora_bias),
        magnitude=None if magnitude is None else exact(magnitude),
    )


def _case(
    layer: nn.Module,
    adapters: list[safemerge.LoraAdapter],
    scale: float,
    kind: str,
    tags: set[str],
    layer_tag: str,
    detail: str,
) -> LayerCase:
    return LayerCase(layer, tuple(adapters), scale, kind, frozenset(tags), layer_tag, detail)


@functools.cache
def _cases() -> tuple[LayerCase, ...]:
    # Built once: a LayerCase's layer is never handed out (fresh_layer copies it).
    return (
        _case(
            # A two-element bias (``bool(tensor)`` of a guard without ``.all()`` raises),
            # and an adapter scale of 4 times 0.5: a lora_bias added unscaled is off by 2x.
            _linear([[0.5, -1.0, 2.0], [0.25, 1.5, -0.75]], [0.125, -0.5], torch.float16),
            [_adapter([[1.0, 0.5, -1.0], [0.25, -0.5, 1.0]], [[0.5, 1.0], [-1.0, 0.25]],
                      alpha=8.0, lora_bias=[0.5, -0.25])],
            0.5, "random", {"linear", "lora-bias"}, "linear",
            "a float16 layer with a two-element bias, a lora_bias at adapter scale 4",
        ),
        _case(
            # Rows and columns of the merge have different norms: DoRA along the wrong
            # axis gives other values.
            _linear([[1.0, 2.0, 3.0], [-4.0, 5.0, 0.5]], None, torch.float32),
            [_adapter([[0.5, -0.25, 1.0]], [[1.0], [-2.0]], magnitude=[1.5, 0.75])],
            1.0, "random", {"linear", "dora"}, "linear",
            "DoRA on a 2 x 3 float32 layer",
        ),
        _case(
            # Two adapters with scales 2 and 1.5 / sqrt(3): using either for both is wrong.
            _linear([[1.0, 0.0, -1.0], [0.5, 2.0, 0.25]], None, torch.bfloat16),
            [
                _adapter([[1.0, -1.0, 0.5]], [[0.5], [1.0]], alpha=2.0),
                _adapter(
                    [[0.25, 0.5, -0.5], [1.0, 0.0, 0.25], [-0.5, 1.0, 1.0]],
                    [[0.5, -0.25, 1.0], [1.0, 0.5, -0.5]],
                    alpha=1.5,
                    use_rslora=True,
                ),
            ],
            1.0, "random", {"linear", "several"}, "linear",
            "a rank-1 adapter with alpha 2 and a rank-3 rsLoRA adapter with alpha 1.5",
        ),
        _case(
            # 60000 + 0.5 * 4 * 5000 = 70000: finite in float32, beyond float16's 65504.
            _linear([[0.5, 0.25], [-1.0, 0.75]], [60000.0, 1.0], torch.float16),
            [_adapter([[0.5, 0.5], [0.25, -0.5]], [[0.5, 0.25], [0.125, -0.5]],
                      alpha=8.0, lora_bias=[5000.0, 0.0])],
            0.5, "bias-overflow", {"linear", "lora-bias"}, "linear",
            "bias[0] = 60000 plus 0.5 * 4 * 5000 = 70000: finite in float32, beyond float16",
        ),
        _case(
            # NaN in lora_bias behind a zero scale: 0 * NaN is NaN.
            _linear([[0.5, 0.25], [-1.0, 0.75]], [0.5, 1.0], torch.float32),
            [_adapter([[0.5, 0.5]], [[0.5], [0.125]], lora_bias=[0.0, math.nan])],
            0.0, "nan", {"linear", "lora-bias"}, "linear",
            "nan in lora_bias[1], scale 0",
        ),
        _case(
            # Blocks of 64 spanning four rows of 16 (bitsandbytes 0.50's CPU dequantize_4bit
            # misplaces some of their absmax), the absmax itself quantized.
            synthetic.quantized_linear(
                torch.linspace(-2.0, 3.0, 256).reshape(16, 16), "nf4", blocksize=64, nested=True
            ),
            [_adapter([[0.25] * 16], [[1.0]] * 8 + [[-0.5]] * 8)],
            0.5, "random", {"nf4"}, "nf4",
            "an NF4 layer 16 x 16, nested blocks of 64",
        ),
        _case(
            # Blocksize 32, not bitsandbytes' default 64: a requantization must keep it.
            synthetic.quantized_linear(
                torch.linspace(-1.0, 1.0, 32).reshape(4, 8), "fp4", blocksize=32,
                bias=torch.tensor([0.5, -0.25, 1.0, 0.0]),
            ),
            [_adapter([[0.5] * 8, [-0.25] * 8], [[1.0, 0.5]] * 4)],
            1.0, "random", {"fp4"}, "fp4",
            "an FP4 layer 4 x 8 with blocks of 32",
        ),
        _case(
            # Rows of whole blocks, as real layers have: 2 rows of 2 blocks of 32, each
            # block in one row (a row-wise fast path that takes the blocks in the wrong
            # order misplaces them; narrow layers, whose blocks straddle rows, never see it).
            synthetic.quantized_linear(
                torch.linspace(-3.0, 2.0, 128).reshape(2, 64), "nf4", blocksize=32
            ),
            [_adapter([[0.25] * 64], [[0.5], [-1.0]])],
            1.0, "random", {"nf4"}, "nf4",
            "an NF4 layer 2 x 64: rows of 2 blocks of 32",
        ),
        _case(
            # 4 rows of 2 nested blocks of 64, and a bias.
            synthetic.quantized_linear(
                torch.linspace(-1.0, 1.5, 512).reshape(4, 128), "fp4", blocksize=64,
                nested=True, bias=torch.tensor([0.5, -0.25, 1.0, 0.0]),
            ),
            [_adapter([[0.125] * 128], [[1.0], [0.5], [-0.5], [0.25]])],
            0.5, "random", {"fp4"}, "fp4",
            "an FP4 layer 4 x 128: rows of 2 nested blocks of 64",
        ),
        _case(
            # bfloat16 adapters on a float32 layer: B @ A is exact in float32, but not in
            # bfloat16 (1.0078125 squared rounds to 1.015625), where PEFT multiplies them
            # off the CPU (and rounds the product back to them on it).
            _linear([[1.0, -0.5, 0.25], [0.5, 2.0, -1.0]], None, torch.float32),
            [_adapter([[1.0078125, -0.5, 0.25]], [[1.0078125], [0.5]], dtype=torch.bfloat16)],
            1.0, "random", {"linear"}, "linear",
            "bfloat16 adapters on a float32 layer 2 x 3",
        ),
        _case(
            # Int8Params quantize through float16: 60000 + 10000 does not fit it.
            synthetic.quantized_linear(torch.tensor([[60000.0, 1.0], [0.5, -2.0]]), "int8"),
            [_adapter([[10000.0, 0.0]], [[1.0], [0.0]])],
            1.0, "cast-overflow", {"int8"}, "int8",
            "weight[0, 0] = 60000 plus 10000 = 70000: finite in float32, beyond float16",
        ),
    )  # fmt: skip


def known_layer_cases(
    kind: str, layer: str, options: frozenset[str], allowed: Collection[str]
) -> list[LayerCase]:
    """The hand-written cases of one exploration cell: ``kind`` on ``layer`` (with exactly
    ``options`` for random cases), using only ``allowed`` tags."""
    found = []
    for case in _cases():
        if (case.kind, case.layer_tag) != (kind, layer) or not case.tags <= set(allowed):
            continue
        if kind == "random" and frozenset(case.options) != options:
            continue
        found.append(case)
    return found
