"""``safemerge.diffusers.fuse_lora`` against diffusers' ``fuse_lora(safe_fusing=True)`` on an
SDXL-shaped UNet: time and peak memory, as ratios.

The UNet is diffusers' ``UNet2DConditionModel`` with the SDXL base 1.0 config values
(below), built on the meta device and filled with seeded ``normal(0, 0.02)`` values in
bfloat16 (no download; random init through the layers' own initialisers would take minutes
on a small machine). A rank-16 PEFT LoRA (``lora_alpha=16``, ``init_lora_weights=False``:
``lora_B`` non-zero, so the merge is real work) goes on every attention projection
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``), added with diffusers' ``unet.add_adapter``.

Each run is a fresh process with a fresh UNet (so neither candidate inherits the other's
allocator state), and the candidates alternate: ``safemerge``, ``diffusers``, ``safemerge``,
... Measured per run:

* time: wall time of the fuse call alone, and of the unfuse after it (safemerge's is exact,
  diffusers' subtracts);
* memory: the process's resident set size (RSS, ``psutil``) sampled every 2 ms during the
  call, peak minus the RSS just before it (torch's CPU allocations are not visible to
  tracemalloc). safemerge keeps an exact-unfuse correction per fused weight (about a
  quarter byte per element); diffusers clones each weight it merges with
  ``safe_fusing=True``.

Threads: by default each candidate runs as a user's call would, with torch's thread count
(safemerge cuts it to the cores the load average leaves idle, see
``safemerge/peft/threads.py``; the output says how many its fuse used). ``--threads N``
sets torch's count in both processes, for a comparison of the work at equal threads. The
1-minute load average is printed per run: on a shared machine it says how busy the cores
were.

Run from the repository root::

    python benchmarks/diffusers_fuse.py            # the full SDXL UNet, 2 runs each
    python benchmarks/diffusers_fuse.py --quick    # transformer_layers_per_block (1, 2, 2):
                                                   # a fraction of SDXL's (1, 2, 10), 1 run each
    python benchmarks/diffusers_fuse.py --quick --threads 1   # both on one thread

A benchmark, not a test: it exits with status 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

#: stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (the values that shape it).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
#: --quick: the last down block's 10 transformer layers (and the up blocks' mirror) cut to 2.
QUICK_TRANSFORMER_LAYERS = [1, 2, 2]
RANK = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CANDIDATES = ("safemerge", "diffusers")


def build_unet(transformer_layers: list[int]) -> Any:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    config = dict(SDXL_UNET, transformer_layers_per_block=transformer_layers)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    torch.manual_seed(1)
    lora = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False)
    unet.add_adapter(lora, adapter_name="style")
    return unet


def one_run(candidate: str, transformer_layers: list[int], threads: int) -> dict[str, float]:
    """Build a fresh UNet, fuse with ``candidate``, return its time and peak RSS increase,
    then unfuse and return that time too."""
    import psutil
    import torch

    import safemerge.diffusers

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    unet = build_unet(transformer_layers)
    parameters = sum(p.numel() for p in unet.parameters())
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load = os.getloadavg()[0]
    fuse_threads = torch.get_num_threads()
    started = time.perf_counter()
    if candidate == "safemerge":
        report = safemerge.diffusers.fuse_lora(unet, lora_scale=0.7)
        fuse_threads = min(record.num_threads for record in report.records.values())
    else:
        unet.fuse_lora(lora_scale=0.7, safe_fusing=True)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)
    started = time.perf_counter()
    if candidate == "safemerge":
        safemerge.diffusers.unfuse_lora(unet)
    else:
        unet.unfuse_lora()
    unfuse_seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "unfuse_seconds": unfuse_seconds,
        "peak_bytes": peak - baseline,
        "parameters": parameters,
        "threads": fuse_threads,
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fraction of the blocks, 1 run each")
    parser.add_argument("--runs", type=int, default=None, help="runs per candidate")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in both (0: torch's default)"
    )
    parser.add_argument("--one", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--layers", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        layers = json.loads(args.layers)
        print(json.dumps(one_run(args.one, layers, args.threads)))
        return
    layers = QUICK_TRANSFORMER_LAYERS if args.quick else SDXL_UNET["transformer_layers_per_block"]
    runs = args.runs or (1 if args.quick else 2)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CANDIDATES}
    for run in range(runs):
        for candidate in CANDIDATES:  # alternating: slow spells fall on both
            command = [sys.executable, __file__, "--one", candidate, "--layers", json.dumps(layers)]
            command += ["--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            results[candidate].append(result)
            print(
                f"run {run + 1} {candidate:9s}: fuse {result['seconds']:7.2f} s "
                f"({result['threads']} thread(s), load average {result['load']:.1f}), peak RSS "
                f"+{result['peak_bytes'] / 2**20:8.1f} MiB; unfuse {result['unfuse_seconds']:7.2f} s",
                flush=True,
            )
    parameters = results["safemerge"][0]["parameters"]
    print(f"\nUNet: transformer_layers_per_block {layers}, {parameters / 1e9:.2f} B parameters")
    print("(bfloat16), rank-16 LoRA on to_q/to_k/to_v/to_out.0; median over runs:")
    median = {
        name: {
            key: statistics.median(r[key] for r in rs)
            for key in ("seconds", "unfuse_seconds", "peak_bytes")
        }
        for name, rs in results.items()
    }
    for name, values in median.items():
        print(
            f"  {name:9s}: fuse {values['seconds']:7.2f} s, peak RSS "
            f"+{values['peak_bytes'] / 2**20:.1f} MiB; unfuse {values['unfuse_seconds']:7.2f} s"
        )
    ours, theirs = median["safemerge"], median["diffusers"]
    print(f"fuse time ratio safemerge / diffusers:   {ours['seconds'] / theirs['seconds']:.2f}")
    unfuse_ratio = ours["unfuse_seconds"] / theirs["unfuse_seconds"]
    print(f"unfuse time ratio safemerge / diffusers: {unfuse_ratio:.2f} (safemerge's is exact)")
    if theirs["peak_bytes"] > 0:
        ratio = ours["peak_bytes"] / theirs["peak_bytes"]
        print(f"peak-memory ratio safemerge / diffusers:  {ratio:.2f}")


if __name__ == "__main__":
    main()
