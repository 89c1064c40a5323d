"""safemerge against PEFT on one GPU: speed, exact unfuse, waits, guard and rollback.

What it does, on the first CUDA device (it prints "no CUDA device" and exits 0 without
one: CI and the 2-core development machines have none):

* Builds, from a seed, Llama-7B-shaped decoder layers (hidden 4096, intermediate 11008,
  32 heads; ``--layers`` of them, 4 by default: 810 M parameters) in bfloat16 on the GPU,
  wrapped by PEFT with a rank-16 LoRA on all 7 projections (random A and B).
* Times, on a fresh model each run, alternating, ``--repeat`` runs each (median):
  PEFT's ``merge_and_unload(safe_merge=True)`` and ``safemerge.peft.merge_and_unload``;
  and, layer by layer, PEFT's ``merge(safe_merge=True)`` against ``safemerge.fuse`` with
  the exact-unfuse correction kept (the default). Every timing ends with a
  ``torch.cuda.synchronize()``. Target: safemerge at least 2x PEFT.
* Exact unfuse on the GPU: fuse then unfuse each projection shape, every bit compared.
* Waits for the device: ``torch.cuda.set_sync_debug_mode("warn")`` during one
  projection's fuse and unfuse, the synchronising calls counted (the engine's GPU path
  waits a fixed number of times a layer, whatever its blocks).
* Guard and rollback: a NaN planted in the last projection's ``lora_B``;
  ``safemerge.peft.merge_and_unload`` must refuse, with every base weight's bits as they
  were (PEFT's ``safe_merge`` is run on the same model for comparison).

Run it from the repository root on a machine with a GPU::

    python benchmarks/gpu_fuse.py
    python benchmarks/gpu_fuse.py --layers 2 --repeat 2   # quicker

It is a benchmark, not a test: it exits with status 0 whether or not the target is met
(status 1 only if a correctness check fails).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

HIDDEN = 4096
INTERMEDIATE = 11008
HEADS = 32
RANK = 16
ALPHA = 32
TARGET = 2.0
SHAPES = {
    "attention (4096x4096)": (4096, 4096),
    "up/gate (11008x4096)": (11008, 4096),
    "down (4096x11008)": (4096, 11008),
}


def build(layers: int, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=1024,
    )
    with device:
        model = LlamaForCausalLM(config).to(dtype=torch.bfloat16)
    lora = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False
    )
    return get_peft_model(model, lora)


def timed(run: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    run(*args, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def model_merges(layers: int, repeat: int, device: torch.device) -> dict[str, list[float]]:
    import safemerge.peft

    times: dict[str, list[float]] = {"peft": [], "safemerge": []}
    for _ in range(repeat):
        for merger in times:
            model = build(layers, device)
            if merger == "peft":
                seconds = timed(model.merge_and_unload, safe_merge=True)
            else:
                seconds = timed(safemerge.peft.merge_and_unload, model)
            times[merger].append(seconds)
            del model
            torch.cuda.empty_cache()
    return times


def layer_fuses(repeat: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per shape: PEFT's layer merge against safemerge.fuse with its correction kept."""
    from peft import LoraConfig, get_peft_model

    import safemerge

    results: dict[str, dict[str, float]] = {}
    for label, (out_features, in_features) in SHAPES.items():
        times: dict[str, list[float]] = {"peft": [], "safemerge": []}
        for _ in range(repeat):
            for merger in times:
                holder = torch.nn.Module()
                holder.proj = torch.nn.Linear(in_features, out_features, bias=False)
                holder.to(device=device, dtype=torch.bfloat16)
                config = LoraConfig(
                    r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False
                )
                lora = get_peft_model(holder, config).base_model.model.proj
                base = lora.base_layer
                if merger == "peft":
                    times[merger].append(timed(lora.merge, safe_merge=True))
                else:
                    adapter = safemerge.LoraAdapter(
                        lora.lora_A["default"].weight, lora.lora_B["default"].weight, ALPHA
                    )
                    times[merger].append(timed(safemerge.fuse, base, adapter))
        results[label] = {merger: statistics.median(values) for merger, values in times.items()}
    return results


def exact_unfuse(device: torch.device) -> list[str]:
    import safemerge
    from safemerge.merge.numerics import int_view

    failures = []
    generator = torch.Generator(device=device).manual_seed(0)
    for label, (out_features, in_features) in SHAPES.items():
        layer = torch.nn.Linear(in_features, out_features, bias=False)
        layer = layer.to(device=device, dtype=torch.bfloat16)
        original = int_view(layer.weight.detach()).clone()
        adapter = safemerge.LoraAdapter(
            torch.randn(RANK, in_features, device=device, generator=generator) * 0.02,
            torch.randn(out_features, RANK, device=device, generator=generator) * 0.02,
            ALPHA,
        )
        record = safemerge.fuse(layer, adapter)
        changed = int((int_view(layer.weight.detach()) != original).sum())
        safemerge.unfuse(layer, record)
        same = torch.equal(int_view(layer.weight.detach()), original)
        print(
            f"  exact unfuse {label}: {changed:,} elements changed by the fuse, "
            f"restored bit for bit: {same}"
        )
        if not same:
            failures.append(f"exact unfuse of {label}")
    return failures


def waits(device: torch.device) -> None:
    import safemerge

    layer = torch.nn.Linear(4096, 11008, bias=False).to(device=device, dtype=torch.bfloat16)
    adapter = safemerge.LoraAdapter(
        torch.randn(RANK, 4096, device=device) * 0.02,
        torch.randn(11008, RANK, device=device) * 0.02,
        ALPHA,
    )
    for step in ("fuse", "unfuse"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if step == "fuse":
                    record = safemerge.fuse(layer, adapter)
                else:
                    safemerge.unfuse(layer, record)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(
            f"  {step} of an 11008x4096 projection: {len(syncs)} synchronising call(s) "
            f"(block rows {record.block_rows})"
        )


def guard_and_rollback(device: torch.device) -> list[str]:
    import safemerge.peft
    from safemerge import NonFiniteMergeError
    from safemerge.merge.numerics import int_view

    model = build(2, device)
    last = model.base_model.model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        last.lora_B["default"].weight[3, 5] = float("nan")
    bases = {
        name: int_view(p.detach()).clone()
        for name, p in model.named_parameters()
        if "lora_" not in name
    }
    try:
        safemerge.peft.merge_and_unload(model)
    except NonFiniteMergeError as error:
        print(f"  safemerge refused: {str(error).splitlines()[0][:120]}")
    else:
        return ["safemerge merged a NaN adapter"]
    changed = [
        name
        for name, p in model.named_parameters()
        if name in bases and not torch.equal(int_view(p.detach()), bases[name])
    ]
    print(f"  base weights changed by the refused merge: {len(changed)} of {len(bases)}")
    return [f"refused merge changed {name}" for name in changed]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fuse: no CUDA device: nothing measured")
        return 0
    device = torch.device("cuda")
    print(
        f"# gpu_fuse on {torch.cuda.get_device_name(device)}, torch {torch.__version__}; "
        f"{args.layers} Llama-7B layers, bf16, LoRA r={RANK} on 7 projections"
    )
    failures = exact_unfuse(device)
    waits(device)
    failures += guard_and_rollback(device)
    build(1, device)  # warm-up: CUDA context, cuBLAS handles, kernels
    times = model_merges(args.layers, args.repeat, device)
    peft, ours = statistics.median(times["peft"]), statistics.median(times["safemerge"])
    verdict = "met" if peft / ours >= TARGET else "NOT met"
    print(
        f"merge_and_unload: PEFT {peft:.3f} s, safemerge {ours:.3f} s: "
        f"{peft / ours:.2f}x PEFT [target {TARGET}x {verdict}]"
    )
    for label, row in layer_fuses(args.repeat, device).items():
        print(
            f"layer {label}: PEFT merge {row['peft'] * 1e3:.2f} ms, safemerge fuse (exact) "
            f"{row['safemerge'] * 1e3:.2f} ms: {row['peft'] / row['safemerge']:.2f}x PEFT"
        )
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
