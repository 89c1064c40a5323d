"""``safemerge fuse`` against transformers + PEFT, end to end, each in a fresh process.

The model is TinyLlama-shaped (``LlamaConfig``: hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 key-value heads, vocabulary 32000; 1.1 B parameters, 2.2 GB in bfloat16) with
random weights, saved by ``save_pretrained`` as bfloat16 safetensors; the adapter is a PEFT
LoRA of rank 16, alpha 32, on all seven projections, with random nonzero A and B
(``init_lora_weights=False``). Both are built once into a cache folder and reused; nothing
is downloaded.

The candidates, each run as a new Python process writing a new model directory:

* ``safemerge fuse MODEL ADAPTER -o OUT --json`` (the installed ``.venv/bin/safemerge``);
* transformers + PEFT: ``from_pretrained(dtype=bfloat16)``, ``PeftModel.from_pretrained``,
  ``merge_and_unload(safe_merge=True)``, ``save_pretrained``.

They alternate (the first of each repeat alternating too), so slow spells of this shared
machine fall on both alike; the medians are reported. Each child's wall time is taken
around its process, its peak resident memory from ``os.wait4`` (the kernel's ``ru_maxrss``
of that one child). The targets: PEFT's time / safemerge's >= 3, and safemerge's peak
memory <= 25% of the model's size. safemerge's own phase breakdown (read, fuse, check,
write, fsync, other) comes from its JSON report; startup (interpreter, imports, argument
parsing) is the child's wall time less the report's.

``--load`` runs a busy process (one core's worth of pure Python) through all the runs,
for the contention target: safemerge should slow down no more than PEFT does.

Run it from the repository root::

    .venv/bin/python benchmarks/end_to_end.py                 # 3 repeats, 2.2 GB model
    .venv/bin/python benchmarks/end_to_end.py --quick         # 4 layers (0.6 GB), 3 repeats
    .venv/bin/python benchmarks/end_to_end.py --load --repeats 5

It is a benchmark, not a test: it exits with status 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: TinyLlama 1.1B's shape.
CONFIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
QUICK_LAYERS = 4
RANK, ALPHA = 16, 32
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SPEEDUP = 3.0
TARGET_MEMORY_FRACTION = 0.25
#: safemerge's phases, as its JSON report names them, in the order printed.
PHASES = ("read", "fuse", "check", "write", "fsync", "other")

ROOT = Path(__file__).resolve().parent.parent
SAFEMERGE = ROOT / ".venv" / "bin" / "safemerge"

#: The PEFT candidate, run as ``python -c``; prints its own phase times as JSON.
PEFT_SCRIPT = """
import json, sys, time
started = time.perf_counter()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
loaded = time.perf_counter()
model = PeftModel.from_pretrained(model, sys.argv[2])
attached = time.perf_counter()
model = model.merge_and_unload(safe_merge=True)
merged = time.perf_counter()
model.save_pretrained(sys.argv[3])
saved = time.perf_counter()
print(json.dumps({"phases": {
    "imports": imported - started, "load": loaded - imported, "adapter": attached - loaded,
    "merge": merged - attached, "save": saved - merged}}))
"""


@dataclass
class Run:
    """One child process: wall seconds, peak RSS bytes, and what it reported."""

    seconds: float
    peak_rss: int
    report: dict[str, Any] = field(default_factory=dict)


def build_inputs(folder: Path, layers: int) -> tuple[Path, Path]:
    """The model and adapter directories under ``folder``, built unless already there."""
    model_dir, adapter_dir = folder / "model", folder / "adapter"
    if (model_dir / "config.json").is_file() and (adapter_dir / "adapter_config.json").is_file():
        return model_dir, adapter_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"building a {layers}-layer model and its adapter in {folder} ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(**{**CONFIG, "num_hidden_layers": layers})
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    # transformers 5's own add_adapter refuses init_lora_weights=False: PEFT's API builds it.
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PROJECTIONS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def run_child(command: list[str], scratch: Path) -> Run:
    """Run ``command``; its wall time, its own peak RSS (``os.wait4``), its last JSON output."""
    with tempfile.TemporaryFile(dir=scratch) as out, tempfile.TemporaryFile(dir=scratch) as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if child.returncode != 0:
            raise RuntimeError(f"{command[:2]} failed ({child.returncode}):\n{err.read().decode()}")
    start = text.find("{")  # safemerge prints one JSON document; PEFT's script its last line
    report = json.loads(text[start:]) if start >= 0 else {}
    return Run(seconds, usage.ru_maxrss * 1024, report)  # ru_maxrss is in KiB on Linux


def safemerge_command(model: Path, adapter: Path, output: Path) -> list[str]:
    return [str(SAFEMERGE), "fuse", str(model), str(adapter), "-o", str(output), "--json"]


def peft_command(model: Path, adapter: Path, output: Path) -> list[str]:
    return [sys.executable, "-c", PEFT_SCRIPT, str(model), str(adapter), str(output)]


def start_load() -> subprocess.Popen[bytes]:
    """A process keeping one core busy (pure Python, no threads) until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def model_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_phases(runs: list[Run]) -> None:
    """safemerge's median time per phase, with startup (wall time less the report's)."""
    rows: dict[str, list[float]] = {
        "startup": [run.seconds - run.report["seconds"] for run in runs]
    }
    for phase in PHASES:
        rows[phase] = [run.report.get("phases", {}).get(phase, float("nan")) for run in runs]
    total = median([run.seconds for run in runs])
    print("\nsafemerge phases (median over runs; startup = interpreter, imports, arguments):")
    for phase, values in rows.items():
        value = median(values)
        print(f"  {phase:8s} {value:7.2f} s  {100 * value / total:5.1f}%")
    print(f"  {'total':8s} {total:7.2f} s")


def print_peft_phases(runs: list[Run]) -> None:
    phases = runs[0].report.get("phases", {}) if runs else {}
    if phases:
        print("\ntransformers + PEFT phases (median over runs):")
        for phase in phases:
            value = median([run.report["phases"][phase] for run in runs])
            print(f"  {phase:8s} {value:7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LAYERS} layers, not 22")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each candidate")
    parser.add_argument("--load", action="store_true", help="a busy process on one core")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "safemerge-benchmarks"
        / "end_to_end",
        help="where the model and adapter are built and kept (default: %(default)s)",
    )
    arguments = parser.parse_args()
    layers = QUICK_LAYERS if arguments.quick else CONFIG["num_hidden_layers"]
    assert isinstance(layers, int)
    model, adapter = build_inputs(arguments.cache / f"llama-{layers}-layers", layers)
    size = model_bytes(model)
    print(
        f"model {model} ({size / 1e9:.2f} GB, {layers} layers), rank-{RANK} adapter on "
        f"{len(PROJECTIONS)} projections; {args_line(arguments)}",
        flush=True,
    )
    load = start_load() if arguments.load else None
    results: dict[str, list[Run]] = {"safemerge": [], "peft": []}
    commands = {"safemerge": safemerge_command, "peft": peft_command}
    averages: list[float] = []
    try:
        with tempfile.TemporaryDirectory(dir=arguments.cache, prefix="runs-") as scratch:
            for repeat in range(arguments.repeats):
                order = ["safemerge", "peft"] if repeat % 2 == 0 else ["peft", "safemerge"]
                for name in order:
                    output = Path(scratch) / f"{name}-{repeat}"
                    averages.append(os.getloadavg()[0])
                    run = run_child(commands[name](model, adapter, output), Path(scratch))
                    results[name].append(run)
                    shutil.rmtree(output)
                    print(
                        f"repeat {repeat + 1}: {name:9s} {run.seconds:6.2f} s, peak RSS "
                        f"{run.peak_rss / 2**20:7.0f} MiB, load average {averages[-1]:.2f}",
                        flush=True,
                    )
    finally:
        if load is not None:
            load.kill()
            load.wait()
    ours, theirs = results["safemerge"], results["peft"]
    ours_time = median([run.seconds for run in ours])
    theirs_time = median([run.seconds for run in theirs])
    ours_rss = median([float(run.peak_rss) for run in ours])
    theirs_rss = median([float(run.peak_rss) for run in theirs])
    speedup = theirs_time / ours_time
    fraction = ours_rss / size
    print(
        f"\nmedians over {arguments.repeats} repeat(s), load average at the starts "
        f"{min(averages):.2f}-{max(averages):.2f} (median {median(averages):.2f}):"
    )
    print(f"  safemerge fuse       {ours_time:6.2f} s  peak RSS {ours_rss / 2**20:7.0f} MiB")
    print(f"  transformers + PEFT  {theirs_time:6.2f} s  peak RSS {theirs_rss / 2**20:7.0f} MiB")
    print(
        f"  speed-up (PEFT time / safemerge time): {speedup:.2f}x "
        f"(target >= {TARGET_SPEEDUP:g}: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})"
    )
    print(
        f"  safemerge peak RSS / model size: {100 * fraction:.1f}% "
        f"(target <= {100 * TARGET_MEMORY_FRACTION:g}%: "
        f"{'met' if fraction <= TARGET_MEMORY_FRACTION else 'NOT met'})"
    )
    print_phases(ours)
    print_peft_phases(theirs)


def args_line(arguments: argparse.Namespace) -> str:
    return (
        f"{arguments.repeats} repeat(s), {'with' if arguments.load else 'no'} busy process, "
        f"{os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
