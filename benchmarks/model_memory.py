"""Peak memory of ``safemerge.fuse_files`` on a multi-gigabyte model, against the model's size.

What it does:

* Builds a Llama-shaped bfloat16 model on disk (TinyLlama-1.1B's shapes by default:
  hidden 2048, intermediate 5632, 4 key/value heads of 64, vocabulary 32000, 22 layers;
  about 2.2 GB), in shards of ``--shard-mb``, tensor by tensor through
  ``safemerge.write_model``'s streaming writer, so building it needs memory for one
  tensor only. Values are seeded ``randn * 0.02``.
* Writes a rank-16 PEFT adapter (alpha 32) for every projection of every layer
  (q, k, v, o, gate, up, down).
* Runs ``safemerge.fuse_files(base, [adapter], output)`` in a child process and reads the
  child's peak resident memory (``VmHWM`` from ``/proc/<pid>/status``, as the report's
  ``peak_rss_bytes`` does), and its resident memory just before the fuse (torch and
  safemerge imported: the fixed cost any run pays).
* Prints both against the model's size (target: peak under 25% of it), and parameters
  per second end to end (open, adapter load, read, fuse, check every element against
  its bound, write, fsync, rename).

Everything goes under a fresh directory in ``--tmp`` (default ``/tmp``), removed at the
end; the free space is checked first (base + output + adapter, with a margin).

Run it from the repository root, on an otherwise idle machine::

    python benchmarks/model_memory.py
    python benchmarks/model_memory.py --layers 4      # a quick, smaller run
    python benchmarks/model_memory.py --threads 1     # on a machine shared with others

It is a benchmark, not a test: it exits with status 0 whether or not the target is met.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import safemerge as sm
from safemerge.io.writer import PlanEntry

HIDDEN = 2048
INTERMEDIATE = 5632
KV = 256  # 4 key/value heads of 64
VOCABULARY = 32000
RANK = 16
ALPHA = 32
#: Peak resident memory of the fuse must stay under this fraction of the model's size.
TARGET_FRACTION = 0.25

_CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0
import torch, safemerge
if int(sys.argv[4]) > 0:
    torch.set_num_threads(int(sys.argv[4]))
before = status("VmRSS")
started = time.perf_counter()
report = safemerge.fuse_files(sys.argv[1], [sys.argv[2]], sys.argv[3])
seconds = time.perf_counter() - started
print(json.dumps({
    "rss_before_bytes": before,
    "peak_rss_bytes": status("VmHWM"),
    "report_peak_rss_bytes": report.peak_rss_bytes,
    "seconds": seconds,
    "parameters": report.parameters,
    "fused_parameters": report.fused_parameters,
    "fused_layers": len(report.fused),
    "tensors": report.tensors_written,
    "shards": report.shard_count,
    "written_bytes": report.written_bytes,
    "worst_error_of_bound": report.worst_error_of_bound,
    "threads": torch.get_num_threads(),
}))
"""


def plan(layers: int) -> list[PlanEntry]:
    """Names, shapes and dtype of the model's tensors, in Hugging Face's Llama naming."""
    entries: list[PlanEntry] = [("model.embed_tokens.weight", (VOCABULARY, HIDDEN), torch.bfloat16)]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name, shape in projections().items():
            entries.append((f"{prefix}.{name}.weight", shape, torch.bfloat16))
        entries.append((f"{prefix}.input_layernorm.weight", (HIDDEN,), torch.bfloat16))
        entries.append((f"{prefix}.post_attention_layernorm.weight", (HIDDEN,), torch.bfloat16))
    entries.append(("model.norm.weight", (HIDDEN,), torch.bfloat16))
    entries.append(("lm_head.weight", (VOCABULARY, HIDDEN), torch.bfloat16))
    return entries


def projections() -> dict[str, tuple[int, int]]:
    """Each projection's weight shape ``(out, in)``."""
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (KV, HIDDEN),
        "self_attn.v_proj": (KV, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def generated(entries: list[PlanEntry], seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors, one at a time."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape, dtype in entries:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_adapter(directory: Path, layers: int, seed: int = 1) -> Path:
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for layer in range(layers):
        for name, (out_features, in_features) in projections().items():
            lora_A = torch.randn(RANK, in_features, generator=generator) / in_features**0.5
            lora_B = torch.randn(out_features, RANK, generator=generator) * 0.01
            adapters[f"model.layers.{layer}.{name}.weight"] = sm.LoraAdapter(lora_A, lora_B, ALPHA)
    return sm.write_peft_adapter(directory, adapters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: 2.2 GB)")
    parser.add_argument("--shard-mb", type=int, default=500, help="base model shard size, MB")
    parser.add_argument("--tmp", default="/tmp", help="where to build the models")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the fuse (0: torch's default)"
    )
    arguments = parser.parse_args()

    entries = plan(arguments.layers)
    model_bytes = sum(sm.files.tensor_nbytes(shape, dtype) for _, shape, dtype in entries)
    parameters = sum(sm.files.tensor_nbytes(shape, torch.int8) for _, shape, _ in entries)
    needed = int(2.2 * model_bytes) + 2**30
    free = shutil.disk_usage(arguments.tmp).free
    if free < needed:
        print(
            f"not enough free space in {arguments.tmp}: need {needed / 2**30:.1f} GiB, "
            f"have {free / 2**30:.1f} GiB; pass --tmp or --layers"
        )
        return
    print(
        f"safemerge {sm.__version__}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} threads"
    )
    work = Path(tempfile.mkdtemp(prefix="safemerge-model-memory-", dir=arguments.tmp))
    try:
        started = time.perf_counter()
        written = sm.write_model(
            work / "base",
            generated(entries),
            plan=entries,
            shard_size=arguments.shard_mb * 10**6,
            metadata={"format": "pt"},
        )
        build_seconds = time.perf_counter() - started
        adapter = write_adapter(work / "adapter", arguments.layers)
        print(
            f"model: {len(entries)} tensors, {parameters / 1e9:.3f} G parameters, "
            f"{model_bytes / 1e9:.3f} GB bfloat16 in {written.shard_count} shards "
            f"(built in {build_seconds:.1f} s); adapter: rank {RANK} on "
            f"{7 * arguments.layers} projections"
        )
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(work / "base"),
                str(adapter),
                str(work / "out"),
                str(arguments.threads),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(f"fuse_files failed (exit {child.returncode}):\n{child.stderr}")
            return
        result = json.loads(child.stdout.strip().splitlines()[-1])
        peak = result["peak_rss_bytes"]
        fraction = peak / model_bytes
        print(
            f"fuse_files: {result['fused_layers']} layers fused, {result['tensors']} tensors "
            f"into {result['shards']} shards in {result['seconds']:.1f} s "
            f"({result['threads']} threads); worst error {result['worst_error_of_bound']:.4f} "
            f"of its bound"
        )
        print(
            f"  parameters per second, end to end: {result['parameters'] / result['seconds']:,.0f}"
        )
        print(
            f"  peak RSS (VmHWM) of the child: {peak / 2**20:,.0f} MiB = {fraction:.1%} of the "
            f"model's {model_bytes / 2**20:,.0f} MiB (target < {TARGET_FRACTION:.0%}: "
            f"{'met' if fraction < TARGET_FRACTION else 'NOT met'})"
        )
        print(
            f"  of which before the fuse (python, torch, safemerge imported): "
            f"{result['rss_before_bytes'] / 2**20:,.0f} MiB; the fuse itself added "
            f"{(peak - result['rss_before_bytes']) / 2**20:,.0f} MiB "
            f"(largest tensor: {max(sm.files.tensor_nbytes(s, d) for _, s, d in entries) / 2**20:,.0f} MiB)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
