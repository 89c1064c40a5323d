"""Quantized merges: safemerge against PEFT's bitsandbytes merge, time and error, one run.

For bitsandbytes ``Linear4bit`` (NF4 nested and FP4, blocksize 64) and ``Linear8bitLt``
layers of Llama shapes with a rank-16 adapter, it times ``safemerge.fuse`` and PEFT's
``merge(safe_merge=True)`` on the LoRA layer wrapping the same quantized weight (the PEFT
model is built outside the timer, a fresh one per repeat; the candidates take turns), and
measures each result's error against the exact merge of the same dequantized weight:
the largest error as a fraction of the element's quantization bound (block or row bound
plus the float32 merge's), and the mean absolute error.

Run it from the repository root::

    python benchmarks/quantized_merge.py            # 3 repeats
    python benchmarks/quantized_merge.py --quick    # 1 repeat, smaller layers

It is a benchmark, not a test: it always exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from typing import Any

import torch
from fuse_throughput import interleaved_best_times  # the same turn-taking timer
from torch import nn

import safemerge
from safemerge.quant import bnb as bnb_io

RANK, ALPHA = 16, 32
#: (kind, nested, blocksize) on the Llama shapes.
CONFIGS = (("nf4", True, 64), ("fp4", False, 64), ("nf4", False, 4096), ("int8", False, 0))
#: Blocks that straddle rows unevenly (blocksize 256 on 96-wide rows): bitsandbytes 0.50's
#: CPU dequantize_4bit misplaces their absmax, and PEFT merges through it.
ODD_CASE = ("nf4", False, 256, (1024, 96))


class Holder(nn.Module):
    """A one-layer model, flagged the way transformers flags quantized models for PEFT."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        eight_bit = type(proj).__name__ == "Linear8bitLt"
        self.is_loaded_in_8bit, self.is_loaded_in_4bit = eight_bit, not eight_bit


def quantized_layer(kind: str, nested: bool, blocksize: int, weight: torch.Tensor) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer: nn.Module
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(
            weight.clone(), requires_grad=False, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, quant_type=kind, compress_statistics=nested
        )
        layer.weight = bnb.nn.Params4bit(
            weight.clone(),
            requires_grad=False,
            quant_type=kind,
            compress_statistics=nested,
            blocksize=64,
        )
    return layer.to("cpu")


def peft_lora_layer(peft: Any, base: nn.Module, adapter: safemerge.LoraAdapter) -> nn.Module:
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(Holder(base), config)
    lora_layer: nn.Module = model.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(adapter.lora_A)
        lora_layer.lora_B["default"].weight.copy_(adapter.lora_B)
    return lora_layer


def error_of(
    layer: nn.Module, weight: torch.Tensor, adapter: safemerge.LoraAdapter
) -> tuple[float, float]:
    """Worst error / bound and mean |error| of a merged quantized layer against the exact merge."""
    quantized = bnb_io.format_of(layer, "proj")
    assert quantized is not None
    fused = quantized.read().double()
    twin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    twin.weight.data = weight.clone()
    _, accumulated = safemerge.expected_fuse(twin, [(adapter, 1.0)])
    safemerge.fuse(twin, adapter)
    exact = weight.double() + adapter.scale * (adapter.lora_B.double() @ adapter.lora_A.double())
    bound = quantized.quantize(twin.weight.detach()).bound + accumulated
    error = (fused - exact).abs()
    return float((error / bound).max()), float(error.mean())


def measure(
    peft: Any, kind: str, nested: bool, blocksize: int, shape: tuple[int, int], repeats: int
) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    template = torch.randn(*shape, generator=generator) * 0.02
    adapter = safemerge.LoraAdapter(
        torch.randn(RANK, shape[1], generator=generator) * 0.01,
        torch.randn(shape[0], RANK, generator=generator) * 0.01,
        alpha=ALPHA,
    )
    dequantized = bnb_io.format_of(
        quantized_layer(kind, nested, blocksize, template), "proj"
    ).read()  # type: ignore[union-attr]

    def ours() -> nn.Module:
        return quantized_layer(kind, nested, blocksize, template)

    def theirs() -> nn.Module:
        return peft_lora_layer(peft, quantized_layer(kind, nested, blocksize, template), adapter)

    merged: dict[str, nn.Module] = {}

    def fuse_ours(layer: nn.Module) -> None:
        safemerge.fuse(layer, adapter)
        merged["safemerge"] = layer

    def merge_theirs(layer: nn.Module) -> None:
        layer.merge(safe_merge=True)
        merged["peft"] = layer

    best = interleaved_best_times(
        {"safemerge": (fuse_ours, ours), "peft": (merge_theirs, theirs)}, repeats
    )
    peft_base = merged["peft"].get_base_layer()
    ours_error = error_of(merged["safemerge"], dequantized, adapter)
    peft_error = error_of(peft_base, dequantized, adapter)
    return {
        "safemerge_s": best["safemerge"],
        "peft_s": best["peft"],
        "safemerge_worst": ours_error[0],
        "peft_worst": peft_error[0],
        "safemerge_mean": ours_error[1],
        "peft_mean": peft_error[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="1 repeat, 1024x1024 and 2048x1024 layers"
    )
    arguments = parser.parse_args()
    repeats = 1 if arguments.quick else arguments.repeats
    shapes = ((1024, 1024), (2048, 1024)) if arguments.quick else ((2048, 2048), (5632, 2048))
    import peft

    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"quantized merge: safemerge {safemerge.__version__} vs peft {peft.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, rank {RANK}, best of {repeats}"
    )
    print(
        f"{'layer':>24} {'shape':>10} {'sm ms':>8} {'peft ms':>8} {'speed':>6} "
        f"{'sm err/bound':>12} {'peft err/bound':>14} {'sm mean|e|':>11} {'peft mean|e|':>12}"
    )
    ratios = []
    for kind, nested, blocksize in CONFIGS:
        for shape in shapes:
            result = measure(peft, kind, nested, blocksize, shape, repeats)
            speed = result["peft_s"] / result["safemerge_s"]
            ratios.append(speed)
            label = (
                "Linear8bitLt"
                if kind == "int8"
                else f"4bit {kind} bs{blocksize}{' nested' if nested else ''}"
            )
            print(
                f"{label:>24} {shape[0]}x{shape[1]:<5} {result['safemerge_s'] * 1e3:8.1f} "
                f"{result['peft_s'] * 1e3:8.1f} {speed:5.2f}x {result['safemerge_worst']:12.3f} "
                f"{result['peft_worst']:14.3f} {result['safemerge_mean']:11.3e} {result['peft_mean']:12.3e}"
            )
    kind, nested, blocksize, shape = ODD_CASE
    result = measure(peft, kind, nested, blocksize, shape, repeats)
    print(
        f"{'4bit nf4 bs256 (odd)':>24} {shape[0]}x{shape[1]:<5} {result['safemerge_s'] * 1e3:8.1f} "
        f"{result['peft_s'] * 1e3:8.1f} {result['peft_s'] / result['safemerge_s']:5.2f}x "
        f"{result['safemerge_worst']:12.3f} {result['peft_worst']:14.3f} "
        f"{result['safemerge_mean']:11.3e} {result['peft_mean']:12.3e}"
    )
    geometric = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"SUMMARY: safemerge is {geometric:.2f}x PEFT's speed (geometric mean); err/bound <= 1 means "
        f"every element within its quantization bound of the exact merge"
    )


if __name__ == "__main__":
    main()
