"""``safemerge.peft.merge_and_unload`` against PEFT's ``merge_and_unload(safe_merge=True)``.

What it does:

* Builds, from a seed, a Llama-shaped model (``transformers.LlamaForCausalLM``;
  TinyLlama-1.1B's layer shapes by default: hidden 2048, intermediate 5632, 4 key/value
  heads of 64; ``--layers`` decoder layers) and wraps it with PEFT: LoRA rank 16,
  alpha 32, every linear projection targeted (q, k, v, o, gate, up, down), adapter
  weights random (``init_lora_weights=False``). Three models: bfloat16, float32, and
  NF4 (every projection a bitsandbytes ``Linear4bit``, compute dtype bfloat16).
* Merges each model in a fresh child process, once by PEFT and once by safemerge,
  alternating, ``--repeat`` times; each child builds the same model, imports both
  libraries, resets its peak resident memory (``/proc/self/clear_refs``), and times only
  the merge and unload (until the previous round, ``import safemerge.peft``, about 0.1 s,
  was timed as part of safemerge's merge, while PEFT's import was not).
* Prints per model the median and best time, the peak resident memory during the merge
  (the model itself included) and the peak above the memory held before it, and the
  ratios PEFT / safemerge of the medians (target: safemerge at least 4x faster, 1.5x for
  NF4, whose merge is mostly requantization, and no higher peak), and the load average
  before and after (the machine may be shared).

Run it from the repository root, on an otherwise idle machine::

    python benchmarks/peft_merge.py
    python benchmarks/peft_merge.py --layers 2 --repeat 1   # a quick run

It is a benchmark, not a test: it exits with status 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

HIDDEN = 2048
INTERMEDIATE = 5632
RANK = 16
ALPHA = 32
MODELS = ("bfloat16", "float32", "nf4")
SPEED_TARGET = 4.0
#: NF4: dequantize, merge, requantize, check every element; PEFT skips the check.
SPEED_TARGETS = {"nf4": 1.5}

_CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from benchmarks.peft_merge import build_peft_model, peak_and_current, reset_peak

merger, model_kind, layers, hidden, intermediate, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
model = build_peft_model(model_kind, int(layers), int(hidden), int(intermediate))
import safemerge.peft  # imported before the clock starts, as PEFT is (by the build)
reset_peak()
_, before = peak_and_current()
started = time.perf_counter()
if merger == "peft":
    merged = model.merge_and_unload(safe_merge=True)
else:
    merged = safemerge.peft.merge_and_unload(model)
seconds = time.perf_counter() - started
peak, _ = peak_and_current()
print(json.dumps({"seconds": seconds, "peak": peak, "before": before}))
"""


def build_peft_model(kind: str, layers: int, hidden: int, intermediate: int) -> torch.nn.Module:
    """The seeded Llama-shaped model of ``kind``, wrapped in a rank-16 all-linear LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=4,
        vocab_size=1024,
    )
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    if kind == "nf4":
        _quantize_projections(model)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules="all-linear",
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    return get_peft_model(model, lora)


def _quantize_projections(model: torch.nn.Module) -> None:
    from safemerge.synthetic import quantized_linear

    for layer in model.model.layers:  # type: ignore[union-attr]
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = quantized_linear(
                        child.weight.detach(), "nf4", compute_dtype=torch.bfloat16
                    )
                    setattr(parent, name, quantized)
    model.is_loaded_in_4bit = True  # how PEFT tells a bitsandbytes model


def reset_peak() -> None:
    """Reset the process's peak resident memory (``VmHWM``) to its current size."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_and_current() -> tuple[int, int]:
    """``(VmHWM, VmRSS)`` of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmHWM"], values["VmRSS"]


def _run(merger: str, kind: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        "-c",
        _CHILD,
        merger,
        kind,
        str(args.layers),
        str(args.hidden),
        str(args.intermediate),
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{merger} on {kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default=",".join(MODELS), help="of " + ", ".join(MODELS))
    args = parser.parse_args()
    print(
        f"# peft_merge: {args.layers} Llama layers (hidden {args.hidden}, intermediate "
        f"{args.intermediate}), LoRA r={RANK} alpha={ALPHA} on all 7 projections; "
        f"{args.threads} threads, {args.repeat} run(s) each; {platform.processor() or platform.machine()}"
    )
    print(f"# load average before: {_load()}")
    header = (
        f"{'model':<9} {'merger':<10} {'seconds':>8} {'best':>7} {'peak MiB':>9} {'+MiB':>7}   "
        f"{'speed-up':>8} {'peak ratio':>10}"
    )
    print(header)
    for kind in args.models.split(","):
        runs: dict[str, list[dict[str, float]]] = {"peft": [], "safemerge": []}
        for _ in range(args.repeat):
            for merger in runs:
                runs[merger].append(_run(merger, kind, args))
        summary = {merger: _median(results) for merger, results in runs.items()}
        peft = summary["peft"]
        for merger, row in summary.items():
            extra = ""
            if merger == "safemerge":
                speed = peft["seconds"] / row["seconds"]
                ratio = row["peak"] / peft["peak"]
                target = SPEED_TARGETS.get(kind, SPEED_TARGET)
                met = "met" if speed >= target and ratio <= 1.0 else "NOT met"
                extra = f"   {speed:>7.2f}x {ratio:>10.3f}   target {target}x {met}"
            best = min(result["seconds"] for result in runs[merger])
            print(
                f"{kind:<9} {merger:<10} {row['seconds']:>8.3f} {best:>7.3f} "
                f"{row['peak'] / 2**20:>9.0f} {(row['peak'] - row['before']) / 2**20:>7.0f}{extra}"
            )
        for merger, results in runs.items():
            print(f"#   {kind} {merger} runs: " + " ".join(f"{r['seconds']:.3f}" for r in results))
    print(f"# load average after: {_load()}")


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except (AttributeError, OSError):
        return "unknown"


def _median(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(result[key] for result in results) for key in results[0]}


if __name__ == "__main__":
    main()
