"""Fuse throughput of safemerge against PEFT's safe merge, and against this machine's bounds.

What it measures, for Llama-shaped ``nn.Linear`` layers (weight ``(out, in)`` =
5632x2048, 2048x5632, 2048x2048) in bfloat16 and float32, with a rank-16 LoRA adapter
(``lora_A``, ``lora_B`` ~ ``randn * 0.01``, ``alpha=32``):

* ``safemerge.fuse`` with ``exact_unfuse=True`` (the default) and ``exact_unfuse=False``,
  and the default again with the compiled block kernel switched off (its torch-op
  fallback, bit-identical); safemerge's finiteness guards are always on. Each fuse goes
  into a fresh copy of the weight, made outside the timer.
* PEFT's ``merge_and_unload(safe_merge=True)`` on a tiny module holding the same
  ``nn.Linear`` as ``proj`` (the PEFT model is built outside the timer, a fresh one per
  repeat, since merging consumes it), and PEFT's layer-level
  ``proj.merge(safe_merge=True)`` as a purer reference.
* This machine's bounds, once at start: memory bandwidth (a 256 MiB float32 ``copy_``,
  read + write bytes), float32 matmul rate (2048x2048x2048 ``torch.mm``) and, per shape,
  the rate of the rank-16 ``(out, 16) @ (16, in)`` matmul into a preallocated output.

Throughput is ``out * in`` parameters divided by the best time over the repeats, each
candidate warmed up once; in every repeat the candidates take turns, so slow spells of
this shared machine fall on all of them alike. The fraction of the machine bound is
``max(bytes / bandwidth, flops / matmul_rate) / measured_time`` with
``bytes = 2 * out * in * itemsize`` (read and write the weight once) and
``flops = 2 * rank * out * in``.

Run it from the repository root::

    python benchmarks/fuse_throughput.py             # 5 repeats
    python benchmarks/fuse_throughput.py --quick     # 2 repeats
    python benchmarks/fuse_throughput.py --repeats 9 --shapes 2048x2048 4096x4096

It is a benchmark, not a test: it always exits with status 0, whether or not the
throughput target is met.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import safemerge as sm
from safemerge.merge import kernel

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((5632, 2048), (2048, 5632), (2048, 2048))
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
RANK = 16
ALPHA = 32
INIT_STD = 0.01
#: safemerge must be this many times PEFT's merge_and_unload throughput (geometric mean),
#: with the exact-unfuse correction kept and without it; and reach this fraction of the
#: machine bound.
TARGET_RATIO = 5.0
TARGET_RATIO_NO_EXACT = 8.0
TARGET_BOUND_FRACTION = 0.4
BANDWIDTH_MIB = 256
MATMUL_SIZE = 2048


# --------------------------------------------------------------------------- timing


def best_time(
    run: Callable[[Any], object],
    repeats: int,
    prepare: Callable[[], Any] = lambda: None,
) -> float:
    """Best wall time of ``run(prepare())`` over ``repeats``, after one warm-up call.

    ``prepare`` runs outside the timer (for work that must be fresh each repeat).
    """
    run(prepare())  # warm-up
    best = math.inf
    for _ in range(repeats):
        state = prepare()
        gc.collect()
        started = time.perf_counter()
        run(state)
        best = min(best, time.perf_counter() - started)
        del state
    return best


# --------------------------------------------------------------------------- machine bounds


@dataclass(frozen=True)
class MachineBounds:
    bandwidth: float  # bytes/s, read + write counted
    matmul_rate: float  # float32 FLOP/s of a large square matmul
    rank_matmul_rate: dict[tuple[int, int], float]  # FLOP/s of the rank-16 matmul, per shape

    def bound_time(self, out_features: int, in_features: int, dtype: torch.dtype) -> float:
        """Lower bound on a fuse: read and write the weight once, and the rank-r matmul."""
        numel = out_features * in_features
        traffic = 2 * numel * torch.empty((), dtype=dtype).element_size()
        flops = 2 * RANK * numel
        return max(traffic / self.bandwidth, flops / self.matmul_rate)


def measure_bandwidth(repeats: int) -> float:
    numel = BANDWIDTH_MIB * 1024 * 1024 // 4
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = best_time(lambda _: dst.copy_(src), repeats)
    return 2 * src.nbytes / seconds


def measure_matmul_rate(repeats: int) -> float:
    n = MATMUL_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    seconds = best_time(lambda _: torch.mm(a, b, out=c), repeats)
    return 2 * n**3 / seconds


def measure_rank_matmul_rate(out_features: int, in_features: int, repeats: int) -> float:
    up = torch.randn(out_features, RANK)
    down = torch.randn(RANK, in_features)
    product = torch.empty(out_features, in_features)
    seconds = best_time(lambda _: torch.mm(up, down, out=product), repeats)
    return 2 * RANK * out_features * in_features / seconds


def measure_bounds(shapes: Sequence[tuple[int, int]], repeats: int) -> MachineBounds:
    return MachineBounds(
        bandwidth=measure_bandwidth(repeats),
        matmul_rate=measure_matmul_rate(repeats),
        rank_matmul_rate={shape: measure_rank_matmul_rate(*shape, repeats) for shape in shapes},
    )


# --------------------------------------------------------------------------- layers


def make_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding a copy of ``weight`` (no costly default init)."""
    out_features, in_features = weight.shape
    meta = nn.Linear(in_features, out_features, bias=False, dtype=weight.dtype, device="meta")
    layer = meta.to_empty(device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def make_adapter(out_features: int, in_features: int) -> sm.LoraAdapter:
    lora_a = torch.randn(RANK, in_features) * INIT_STD
    lora_b = torch.randn(out_features, RANK) * INIT_STD
    return sm.LoraAdapter(lora_a, lora_b, alpha=ALPHA)


class Holder(nn.Module):
    """The smallest model PEFT can wrap: one Linear named ``proj``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.proj(x)
        return output


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Result:
    shape: tuple[int, int]
    dtype_name: str
    safemerge_exact: float  # seconds
    safemerge_plain: float  # seconds, exact_unfuse=False
    safemerge_torch_ops: float  # seconds, exact, the compiled kernel switched off
    peft_unload: float | None  # seconds, merge_and_unload(safe_merge=True)
    peft_layer: float | None  # seconds, proj.merge(safe_merge=True)
    correction_fraction: float  # correction bytes / weight bytes

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def rate(self, seconds: float | None) -> float | None:
        """Parameters per second."""
        return None if seconds is None else self.numel / seconds


def interleaved_best_times(
    candidates: dict[str, tuple[Callable[[Any], object], Callable[[], Any]]], repeats: int
) -> dict[str, float]:
    """Best time of each ``run(prepare())``, the candidates taking turns in every repeat.

    Taking turns spreads this machine's slow spells (other tenants, steal time) evenly over
    the candidates, so their ratios are fairer than timing each in a block of its own.
    """
    for run, prepare in candidates.values():
        run(prepare())  # warm-up
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(repeats):
        for name, (run, prepare) in candidates.items():
            state = prepare()
            gc.collect()
            started = time.perf_counter()
            run(state)
            best[name] = min(best[name], time.perf_counter() - started)
            del state
    return best


def peft_model(peft: Any, template: torch.Tensor, adapter: sm.LoraAdapter) -> Any:
    """A fresh PEFT model around a copy of ``template``, with the benchmark's LoRA factors."""
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False
    )
    model = peft.get_peft_model(Holder(make_linear(template)), config)
    lora_layer = model.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(adapter.lora_A)
        lora_layer.lora_B["default"].weight.copy_(adapter.lora_B)
    return model


def measure(peft: Any | None, shape: tuple[int, int], dtype_name: str, repeats: int) -> Result:
    out_features, in_features = shape
    template = torch.randn(out_features, in_features).to(DTYPES[dtype_name])
    adapter = make_adapter(out_features, in_features)
    layer = make_linear(template)

    def no_state() -> None:
        return None

    def fresh_peft_model() -> Any:
        return peft_model(peft, template, adapter)

    def fresh_layer() -> nn.Linear:
        return make_linear(template)

    def fuse_with_torch_ops(fresh: nn.Linear) -> object:
        with kernel.disabled():
            return sm.fuse(fresh, adapter, exact_unfuse=True)

    # Every candidate gets a fresh copy of the weight, made outside the timer, as PEFT's
    # candidates get a fresh model: no warm repeats of one fused weight.
    candidates: dict[str, tuple[Callable[[Any], object], Callable[[], Any]]] = {
        "exact": (lambda fresh: sm.fuse(fresh, adapter, exact_unfuse=True), fresh_layer),
        "plain": (lambda fresh: sm.fuse(fresh, adapter, exact_unfuse=False), fresh_layer),
        "torch ops": (fuse_with_torch_ops, fresh_layer),
    }
    if peft is not None:
        candidates["unload"] = (
            lambda model: model.merge_and_unload(safe_merge=True),
            fresh_peft_model,
        )
        candidates["layer"] = (
            lambda model: model.base_model.model.proj.merge(safe_merge=True),
            fresh_peft_model,
        )
    best = interleaved_best_times(candidates, repeats)
    record = sm.fuse(layer, adapter, exact_unfuse=True)
    return Result(
        shape,
        dtype_name,
        best["exact"],
        best["plain"],
        best["torch ops"],
        best.get("unload"),
        best.get("layer"),
        record.nbytes / record.weight_nbytes,
    )


# --------------------------------------------------------------------------- report


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def print_header(repeats: int, peft: Any | None) -> None:
    peft_version = peft.__version__ if peft is not None else "not installed"
    print("safemerge fuse throughput")
    print(
        f"torch {torch.__version__} | torch threads {torch.get_num_threads()} | "
        f"cpus {os.cpu_count()} | peft {peft_version} | safemerge {sm.__version__} | "
        f"python {platform.python_version()}"
    )
    print(f"rank {RANK}, alpha {ALPHA}, best of {repeats} after 1 warm-up; Mp/s = 1e6 parameters/s")
    print()


def print_bounds(bounds: MachineBounds) -> None:
    lines = [
        (
            f"memory bandwidth ({BANDWIDTH_MIB} MiB float32 copy, read+write)",
            f"{bounds.bandwidth / 1e9:8.2f} GB/s",
        ),
        (f"float32 matmul ({MATMUL_SIZE}^3 torch.mm)", f"{bounds.matmul_rate / 1e9:8.2f} GFLOP/s"),
    ]
    for shape, rate in bounds.rank_matmul_rate.items():
        seconds = 2 * RANK * shape[0] * shape[1] / rate
        label = f"rank-{RANK} matmul ({shape[0]}x{RANK})@({RANK}x{shape[1]}) into float32"
        lines.append((label, f"{rate / 1e9:8.2f} GFLOP/s ({seconds * 1e3:.2f} ms)"))
    width = max(len(label) for label, _ in lines)
    print("machine bounds")
    for label, value in lines:
        print(f"  {label:<{width}}  {value}")
    print()


THROUGHPUT_COLUMNS = (
    ("shape", 10, ""),
    ("dtype", 9, ""),
    ("sm exact", 9, "9.1f"),
    ("sm noex", 9, "9.1f"),
    ("sm ops", 9, "9.1f"),
    ("peft m&u", 9, "9.1f"),
    ("peft lyr", 9, "9.1f"),
    ("ex/m&u", 7, "7.2f"),
    ("nx/m&u", 7, "7.2f"),
    ("ex/lyr", 7, "7.2f"),
    ("nx/lyr", 7, "7.2f"),
    ("corr/W", 7, "7.3f"),
)


def print_table(columns: Sequence[tuple[str, int, str]], rows: Sequence[Sequence[object]]) -> None:
    print("  ".join(f"{title:>{width}}" for title, width, _ in columns))
    for row in rows:
        cells = []
        for (_, width, spec), value in zip(columns, row, strict=True):
            text = value if isinstance(value, str) else cell(value, spec)  # type: ignore[arg-type]
            cells.append(f"{text:>{width}}")
        print("  ".join(cells))
    print()


def print_throughput(results: Sequence[Result]) -> None:
    print("throughput (Mp/s) and ratios of throughput (safemerge / PEFT)")
    rows = []
    for r in results:
        exact, plain = r.rate(r.safemerge_exact), r.rate(r.safemerge_plain)
        torch_ops = r.rate(r.safemerge_torch_ops)
        unload, layer = r.rate(r.peft_unload), r.rate(r.peft_layer)
        rows.append(
            (
                shape_name(r.shape),
                r.dtype_name,
                exact / 1e6 if exact else None,
                plain / 1e6 if plain else None,
                torch_ops / 1e6 if torch_ops else None,
                unload / 1e6 if unload else None,
                layer / 1e6 if layer else None,
                ratio(exact, unload),
                ratio(plain, unload),
                ratio(exact, layer),
                ratio(plain, layer),
                r.correction_fraction,
            )
        )
    print_table(THROUGHPUT_COLUMNS, rows)
    print("  sm exact/noex: safemerge.fuse with exact_unfuse=True/False")
    print("  sm ops: exact, with the compiled kernel switched off (its torch-op fallback)")
    print("  peft m&u: merge_and_unload(safe_merge=True); peft lyr: proj.merge(safe_merge=True)")
    print("  ex/nx: safemerge exact/noex; corr/W: exact-unfuse correction bytes / weight bytes")
    print()


BOUND_COLUMNS = (
    ("shape", 10, ""),
    ("dtype", 9, ""),
    ("bound ms", 9, "9.2f"),
    ("limit", 6, ""),
    ("r16mm ms", 9, "9.2f"),
    ("exact ms", 9, "9.2f"),
    ("frac", 6, "6.3f"),
    ("noex ms", 9, "9.2f"),
    ("frac", 6, "6.3f"),
)


def print_fractions(results: Sequence[Result], bounds: MachineBounds) -> None:
    print("fraction of the machine bound achieved by safemerge (bound time / measured time)")
    rows = []
    for r in results:
        dtype = DTYPES[r.dtype_name]
        bound = bounds.bound_time(*r.shape, dtype)
        memory_time = 2 * r.numel * torch.empty((), dtype=dtype).element_size() / bounds.bandwidth
        rank_mm = 2 * RANK * r.numel / bounds.rank_matmul_rate[r.shape]
        rows.append(
            (
                shape_name(r.shape),
                r.dtype_name,
                bound * 1e3,
                "memory" if memory_time >= bound else "flops",
                rank_mm * 1e3,
                r.safemerge_exact * 1e3,
                bound / r.safemerge_exact,
                r.safemerge_plain * 1e3,
                bound / r.safemerge_plain,
            )
        )
    print_table(BOUND_COLUMNS, rows)
    fractions = [
        bounds.bound_time(*r.shape, DTYPES[r.dtype_name]) / r.safemerge_exact for r in results
    ]
    mean = geometric_mean(fractions)
    if mean is not None:
        met = "met" if mean >= TARGET_BOUND_FRACTION else "NOT met"
        print(
            f"  geometric mean fraction (exact): {mean:.3f} "
            f"[{TARGET_BOUND_FRACTION:g} target {met}]"
        )
    print("  bound = max(2*out*in*itemsize / bandwidth, 2*rank*out*in / matmul rate)")
    print("  r16mm: the rank-16 matmul alone into a float32 (out, in) buffer, for reference")
    print()


def geometric_mean(values: Sequence[float]) -> float | None:
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def print_summary(results: Sequence[Result], target: float) -> None:
    def geo(mode: str, reference: str) -> float | None:
        # Throughput ratio safemerge/PEFT is the time ratio PEFT/safemerge.
        values = [ratio(getattr(r, reference), getattr(r, mode)) for r in results]
        return geometric_mean([v for v in values if v is not None])

    exact, plain = geo("safemerge_exact", "peft_unload"), geo("safemerge_plain", "peft_unload")
    exact_layer, plain_layer = (
        geo("safemerge_exact", "peft_layer"),
        geo("safemerge_plain", "peft_layer"),
    )
    if exact is None or plain is None:
        print("SUMMARY: PEFT not available, no ratio computed")
        return

    def verdict(value: float, goal: float) -> str:
        return "met" if value >= goal else "NOT met"

    print(
        f"SUMMARY: geometric-mean throughput ratio vs PEFT merge_and_unload(safe_merge=True): "
        f"safemerge(exact) {exact:.2f}x [{target:g}x target {verdict(exact, target)}], "
        f"safemerge(no exact) {plain:.2f}x "
        f"[{TARGET_RATIO_NO_EXACT:g}x target {verdict(plain, TARGET_RATIO_NO_EXACT)}]"
    )
    print(
        f"         vs PEFT layer merge(safe_merge=True): "
        f"safemerge(exact) {cell(exact_layer, '.2f')}x, safemerge(no exact) {cell(plain_layer, '.2f')}x"
    )


# --------------------------------------------------------------------------- main


def import_peft_quietly() -> Any | None:
    """Import PEFT with its (and bitsandbytes') warnings silenced; None if not installed."""
    warnings.filterwarnings("ignore")
    for name in ("peft", "bitsandbytes", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import peft
    except ImportError:
        return None
    return peft


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out_features, in_features = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be OUTxIN, e.g. 5632x2048, not {text!r}"
        ) from None
    return out_features, in_features


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per measurement (best is kept)"
    )
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=list(DEFAULT_SHAPES),
        metavar="OUTxIN",
        help="weight shapes (out, in); default: 5632x2048 2048x5632 2048x2048",
    )
    parser.add_argument("--quick", action="store_true", help="fast run: 2 repeats")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch random seed for weights and adapters"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=TARGET_RATIO,
        help="throughput ratio safemerge/PEFT merge_and_unload to meet (geometric mean); default 5",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    args.repeats = max(1, args.repeats)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    peft = import_peft_quietly()
    print_header(args.repeats, peft)
    bounds = measure_bounds(args.shapes, args.repeats)
    print_bounds(bounds)
    results = [
        measure(peft, shape, dtype_name, args.repeats)
        for shape in args.shapes
        for dtype_name in DTYPES
    ]
    print_throughput(results)
    print_fractions(results, bounds)
    print_summary(results, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
