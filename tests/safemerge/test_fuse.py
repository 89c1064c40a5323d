"""fuse and unfuse on every layer kind and dtype: accuracy, exactness, atomicity, records."""

from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import safemerge
import safemerge.merge.correction
import safemerge.merge.guard
from safemerge import (
    AdapterConfigError,
    LoraAdapter,
    NonFiniteMergeError,
    RestoreError,
    expected_fuse,
    fuse,
    unfuse,
)
from safemerge.merge import kernel
from safemerge.merge.numerics import SUPPORTED_DTYPES, int_view, ordered_bits

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
KINDS = ("linear", "fan_in_fan_out", "embedding", "conv1d", "conv2d", "conv3d")


class TransposedLinear(nn.Module):
    """GPT-2's Conv1D: weight stored (in, out)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.05)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.05)


def make_layer(
    kind: str, dtype: torch.dtype, in_features: int = 37, out_features: int = 23
) -> nn.Module:
    layer: nn.Module
    if kind == "linear":
        layer = nn.Linear(in_features, out_features)
    elif kind == "fan_in_fan_out":
        layer = TransposedLinear(in_features, out_features)
    elif kind == "embedding":
        layer = nn.Embedding(in_features, out_features)
    elif kind == "conv1d":
        layer = nn.Conv1d(in_features, out_features, 3)
    elif kind == "conv2d":
        layer = nn.Conv2d(in_features, out_features, (1, 3))
    else:
        layer = nn.Conv3d(in_features, out_features, 1)
    layer.weight.data = layer.weight.data.to(dtype)
    bias = getattr(layer, "bias", None)
    if bias is not None and dtype not in FLOAT8:
        bias.data = bias.data.to(dtype)
    return layer


def make_adapter(layer: nn.Module, rank: int = 4, seed: int = 0, **options: object) -> LoraAdapter:
    from safemerge.merge.view import view_layer

    view = view_layer(layer)
    generator = torch.Generator().manual_seed(seed)
    kernel = view.kernel_size
    lora_A = torch.randn(rank, view.in_features, *kernel, generator=generator) * 0.1
    lora_B = torch.randn(view.out_features, rank, *(1 for _ in kernel), generator=generator) * 0.1
    return LoraAdapter(
        lora_A, lora_B, alpha=2 * rank, fan_in_fan_out=view.kind == "fan_in_fan_out", **options
    )  # type: ignore[arg-type]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return int_view(tensor.detach().clone())


def snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: bits(tensor) for name, tensor in layer.state_dict().items()}


def assert_unchanged(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(layer)
    for name, pattern in before.items():
        assert torch.equal(after[name], pattern), f"{name} changed"


def assert_within(actual: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    """Every element within its bound; returns the worst error as a fraction of the bound."""
    error = (actual.detach().to(torch.float64) - reference).abs()
    ratio = float((error / bound).max())
    assert ratio <= 1.0, (
        f"error {ratio:.3g}x its bound at {divmod(int((error / bound).argmax()), reference.shape[-1])}"
    )
    return ratio


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fuse_is_within_bound_and_unfuse_restores_every_bit(kind: str, dtype: torch.dtype) -> None:
    layer = make_layer(kind, dtype)
    adapter = make_adapter(layer, lora_bias=None)
    before = snapshot(layer)
    reference, bound = expected_fuse(layer, [(adapter, 1.0)], scale=0.75)

    record = fuse(layer, adapter, scale=0.75, name=kind)

    assert_within(layer.weight, reference, bound)
    assert record.exact and record.layer == kind and record.dtype == dtype
    unfuse(layer, record)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_arithmetic_unfuse_drifts_within_its_bound_and_exact_does_not(dtype: torch.dtype) -> None:
    layer = make_layer("linear", dtype, 300, 200)
    original = layer.weight.detach().clone()
    adapter = make_adapter(layer, rank=8)
    _, fuse_bound = expected_fuse(layer, [(adapter, 1.0)])
    record = fuse(layer, adapter)
    # Unfusing is a fuse of -delta into N: its bound is the same formula at N.
    _, unfuse_bound = expected_fuse(layer, [(adapter, -1.0)])
    unfuse(layer, record, exact=False)

    drift = (layer.weight.detach().to(torch.float64) - original.to(torch.float64)).abs()
    assert bool((drift <= fuse_bound + unfuse_bound).all())
    changed = float((ordered_bits(layer.weight.detach()) != ordered_bits(original)).float().mean())
    assert changed > 0.0  # subtraction is not the inverse: the drift is real...
    assert changed < 0.5  # ...and an ulp or so at a minority of elements


def test_scale_zero_and_negative_scales_are_ordinary_merges() -> None:
    layer = make_layer("linear", torch.bfloat16)
    adapter = make_adapter(layer)
    for scale in (0.0, -1.5, 1e-30, 3.0):
        reference, bound = expected_fuse(layer, [(adapter, 1.0)], scale=scale)
        before = snapshot(layer)
        record = fuse(layer, adapter, scale=scale)
        assert_within(layer.weight, reference, bound)
        unfuse(layer, record)
        assert_unchanged(layer, before)


@pytest.mark.parametrize("scale", [1.0, 0.0, -2.0, 1e-30])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["lora_A_first", "lora_B_last"])
def test_non_finite_adapters_are_refused_whatever_the_scale(
    scale: float, poison: float, where: str
) -> None:
    layer = make_layer("linear", torch.float16)
    adapter = make_adapter(layer)
    if where == "lora_A_first":
        adapter.lora_A[0, 0] = poison
    else:
        adapter.lora_B[-1, -1] = poison
    adapter_bits = (bits(adapter.lora_A), bits(adapter.lora_B))
    before = snapshot(layer)

    with pytest.raises(NonFiniteMergeError) as caught:
        fuse(layer, adapter, scale=scale, name="model.q_proj")

    assert_unchanged(layer, before)
    assert torch.equal(bits(adapter.lora_A), adapter_bits[0]) and torch.equal(
        bits(adapter.lora_B), adapter_bits[1]
    )
    error = caught.value
    assert error.layer == "model.q_proj" and error.tensor == "weight" and error.bad_count > 0
    if where == "lora_B_last":  # a row of the delta is poisoned: its first element comes first
        assert error.first_index == (layer.weight.shape[0] - 1, 0)


def test_overflow_only_on_the_cast_back_is_refused_and_counted() -> None:
    layer = nn.Linear(4, 3, bias=False).half()
    layer.weight.data.fill_(60000.0)
    layer.weight.data[0, 0] = 0.0
    lora_A = torch.ones(1, 4)
    lora_B = torch.full((3, 1), 10000.0)  # 60000 + 10000 is finite in float32, not in float16
    lora_B[1, 0] = -130000.0  # -70000: overflows to -Inf
    before = snapshot(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        fuse(layer, LoraAdapter(lora_A, lora_B))
    assert_unchanged(layer, before)
    error = caught.value
    assert (error.nan_count, error.posinf_count, error.neginf_count) == (0, 0, 0)
    assert error.overflow_count == 11 and error.first_index == (0, 1)


def test_products_overflowing_float16_are_fine_in_a_float32_weight() -> None:
    layer = nn.Linear(4, 3, bias=False)
    adapter = LoraAdapter(torch.full((1, 4), 300.0), torch.full((3, 1), 300.0))  # 90000 > 65504
    reference, bound = expected_fuse(layer, [(adapter, 1.0)])
    fuse(layer, adapter)
    assert_within(layer.weight, reference, bound)
    half = nn.Linear(4, 3, bias=False).half()
    with pytest.raises(NonFiniteMergeError):
        fuse(half, adapter)


def test_float8_e4m3fn_saturation_is_refused() -> None:
    layer = make_layer("linear", torch.float8_e4m3fn, 4, 3)
    adapter = LoraAdapter(torch.ones(1, 4), torch.full((3, 1), 500.0))
    before = snapshot(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        fuse(layer, adapter)
    assert caught.value.overflow_count == 12
    assert_unchanged(layer, before)


#: Where each path of the engine can be interrupted: the torch-op path's guard and
#: correction, and the compiled kernel's block call and correction record.
_INTERRUPTIBLE = {
    "torch ops": [
        "safemerge.merge.guard.block_fits",
        "safemerge.merge.correction.CorrectionBuilder.add",
    ],
    "compiled": [
        "safemerge.merge.kernel.fuse_block",
        "safemerge.merge.correction.CorrectionBuilder.record",
    ],
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("failing_call", [1, 2, 5])
@pytest.mark.parametrize(
    ("path", "target"),
    [(path, target) for path, targets in _INTERRUPTIBLE.items() for target in targets],
)
def test_an_exception_midway_leaves_the_layer_untouched(
    monkeypatch: pytest.MonkeyPatch, path: str, target: str, failing_call: int, threads: int
) -> None:
    import safemerge.merge.engine as engine

    if path == "compiled" and not kernel.compiled():
        pytest.skip("the compiled kernel is not built here")
    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 4 * 8)  # 8 rows a block: many blocks
    layer = make_layer("linear", torch.bfloat16, 64, 64)
    adapter = make_adapter(layer)
    before = snapshot(layer)
    module_name, _, attribute = target.rpartition(".")
    owner: object
    if module_name.endswith("CorrectionBuilder"):
        owner = safemerge.merge.correction.CorrectionBuilder
    else:
        owner = importlib.import_module(module_name)
    original: Callable[..., object] = getattr(owner, attribute)
    calls = []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == failing_call:
            raise KeyboardInterrupt("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)
    with engine.pinned_threads(threads), _engine_path(path), pytest.raises(KeyboardInterrupt):
        fuse(layer, adapter)
    assert calls, f"{target} was never called: the test did not interrupt the {path} path"
    assert_unchanged(layer, before)


def _engine_path(path: str) -> contextlib.AbstractContextManager[None]:
    return kernel.disabled() if path == "torch ops" else contextlib.nullcontext()


def test_bias_refusal_leaves_the_weight_untouched_too() -> None:
    layer = make_layer("linear", torch.float16)
    adapter = make_adapter(layer, lora_bias=torch.full((23,), 1e6))
    before = snapshot(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        fuse(layer, adapter)
    assert caught.value.tensor == "bias" and caught.value.overflow_count == 23
    assert_unchanged(layer, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_is_added_scaled_and_restored_exactly(dtype: torch.dtype) -> None:
    layer = make_layer("linear", dtype)
    lora_bias = torch.randn(23, generator=torch.Generator().manual_seed(3))
    adapter = make_adapter(layer, lora_bias=lora_bias)
    bias_before = layer.bias.detach().to(torch.float64).clone()
    before = snapshot(layer)
    record = fuse(layer, adapter, scale=0.5)
    expected_bias = bias_before + 0.5 * adapter.scale * lora_bias.to(torch.float64)
    # Two float32 roundings (product, sum) and the cast: from the arithmetic, like the weight's.
    from safemerge.merge.bounds import cast_bound, gamma

    bound = gamma(2) * (bias_before.abs() + (0.5 * adapter.scale * lora_bias.double()).abs())
    bound = bound + cast_bound(expected_bias.abs() + bound, dtype)
    assert_within(layer.bias, expected_bias, bound)
    assert record.original_bias is not None
    unfuse(layer, record)
    assert_unchanged(layer, before)


def test_identity_dtype_device_and_grad_flag_are_kept() -> None:
    layer = make_layer("linear", torch.bfloat16)
    weight, bias = layer.weight, layer.bias
    storage = weight.untyped_storage().data_ptr()
    record = fuse(layer, make_adapter(layer))
    assert layer.weight is weight and layer.bias is bias
    assert weight.untyped_storage().data_ptr() == storage
    assert (weight.dtype, weight.device, weight.requires_grad) == (
        torch.bfloat16,
        torch.device("cpu"),
        True,
    )
    unfuse(layer, record)
    assert layer.weight is weight


def test_adapters_are_never_modified() -> None:
    layer = make_layer("conv2d", torch.float16)
    adapter = make_adapter(layer, magnitude=torch.rand(23) + 0.5)
    tensors = (adapter.lora_A, adapter.lora_B, adapter.magnitude)
    before = [bits(t) for t in tensors if t is not None]
    record = fuse(layer, adapter)
    unfuse(layer, record)
    unfuse_again = fuse(layer, adapter)
    unfuse(layer, unfuse_again, exact=False)
    assert all(
        torch.equal(bits(t), b)
        for t, b in zip([t for t in tensors if t is not None], before, strict=True)
    )


def test_several_adapters_with_weights() -> None:
    layer = make_layer("linear", torch.bfloat16)
    first, second = make_adapter(layer, rank=3, seed=1), make_adapter(layer, rank=5, seed=2)
    second_rslora = LoraAdapter(second.lora_A, second.lora_B, alpha=8, use_rslora=True)
    pairs = [(first, 0.7), (second_rslora, -0.3)]
    reference, bound = expected_fuse(layer, pairs, scale=1.25)
    before = snapshot(layer)
    record = fuse(layer, pairs, scale=1.25)
    assert_within(layer.weight, reference, bound)
    assert record.coefficients == (0.7 * first.scale * 1.25, -0.3 * second_rslora.scale * 1.25)
    unfuse(layer, record)
    assert_unchanged(layer, before)


def test_plain_list_of_adapters_means_weight_one() -> None:
    layer = make_layer("linear", torch.float32)
    first, second = make_adapter(layer, seed=1), make_adapter(layer, seed=2)
    twin = copy.deepcopy(layer)
    fuse(layer, [first, second])
    fuse(twin, [(first, 1.0), (second, 1.0)])
    assert torch.equal(layer.weight, twin.weight)


def test_rank_larger_than_the_layer() -> None:
    layer = make_layer("linear", torch.float16, 3, 2)
    adapter = make_adapter(layer, rank=16)
    reference, bound = expected_fuse(layer, [(adapter, 1.0)])
    before = snapshot(layer)
    record = fuse(layer, adapter)
    assert_within(layer.weight, reference, bound)
    unfuse(layer, record)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("kind", ["linear", "fan_in_fan_out", "embedding", "conv2d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_renormalises_each_output_channel(kind: str, dtype: torch.dtype) -> None:
    layer = make_layer(kind, dtype)
    magnitude = torch.rand(23, generator=torch.Generator().manual_seed(4)) + 0.5
    adapter = make_adapter(layer, magnitude=magnitude)
    reference, bound = expected_fuse(layer, [(adapter, 1.0)], scale=0.5)
    before = snapshot(layer)
    record = fuse(layer, adapter, scale=0.5)
    assert_within(layer.weight, reference, bound)
    # PEFT's definition, independently: the norm of each output channel is the magnitude.
    weight = layer.weight.detach().to(torch.float64)
    per_output = weight.T if kind in ("fan_in_fan_out", "embedding") else weight.reshape(23, -1)
    norms = torch.linalg.vector_norm(per_output, dim=1)
    relative = float(((norms - magnitude.double()) / magnitude.double()).abs().max())
    assert relative < 2 ** -(8 if dtype == torch.bfloat16 else 20) * 4
    unfuse(layer, record)
    assert_unchanged(layer, before)


def test_dora_with_other_adapters_is_refused() -> None:
    layer = make_layer("linear", torch.float32)
    dora = make_adapter(layer, magnitude=torch.ones(23))
    with pytest.raises(AdapterConfigError, match="one at a time"):
        fuse(layer, [dora, make_adapter(layer, seed=5)])


def test_correction_is_at_most_a_quarter_of_the_weight_for_realistic_adapters() -> None:
    # Llama-like statistics: weights ~ N(0, 0.02), kaiming-uniform A, a trained B ~ 1e-3.
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        layer = nn.Linear(512, 384, bias=False)
        layer.weight.data = (torch.randn(384, 512, generator=generator) * 0.02).to(dtype)
        bound_a = (6 / 512) ** 0.5
        lora_A = (torch.rand(16, 512, generator=generator) * 2 - 1) * bound_a
        lora_B = torch.randn(384, 16, generator=generator) * 1e-3
        record = fuse(layer, LoraAdapter(lora_A, lora_B, alpha=32))
        assert record.nbytes <= record.weight_nbytes / 4, (
            dtype,
            record.nbytes,
            record.weight_nbytes,
        )


def test_unfuse_refuses_what_it_cannot_restore() -> None:
    layer = make_layer("linear", torch.bfloat16)
    adapter = make_adapter(layer)
    record = fuse(layer, adapter, exact_unfuse=False)
    assert not record.exact and record.nbytes == 0
    with pytest.raises(RestoreError, match="exact_unfuse=False"):
        unfuse(layer, record)
    unfuse(layer, record, exact=False)

    record = fuse(layer, adapter)
    unfuse(layer, record)
    with pytest.raises(RestoreError, match="changed since"):
        unfuse(layer, record)  # twice
    with pytest.raises(RestoreError, match="shape"):
        unfuse(make_layer("linear", torch.bfloat16, 5, 5), record)


def test_nested_fuses_unfuse_in_reverse_order() -> None:
    layer = make_layer("linear", torch.float16)
    before = snapshot(layer)
    first = fuse(layer, make_adapter(layer, seed=1))
    middle = snapshot(layer)
    second = fuse(layer, make_adapter(layer, seed=2))
    with pytest.raises(RestoreError):
        unfuse(layer, first)
    unfuse(layer, second)
    assert_unchanged(layer, middle)
    unfuse(layer, first)
    assert_unchanged(layer, before)


def test_exact_unfuse_survives_a_change_of_thread_count() -> None:
    threads = torch.get_num_threads()
    layer = make_layer("linear", torch.bfloat16, 700, 300)
    before = snapshot(layer)
    record = fuse(layer, make_adapter(layer, rank=16))
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        unfuse(layer, record)
        assert torch.get_num_threads() == (1 if threads > 1 else 2)
    finally:
        torch.set_num_threads(threads)
    assert_unchanged(layer, before)


def test_non_contiguous_weight_is_fused_in_its_own_storage() -> None:
    layer = nn.Linear(30, 20, bias=False)
    layer.weight = nn.Parameter(torch.randn(30, 20).T)  # a transposed view
    adapter = make_adapter(layer)
    reference, bound = expected_fuse(layer, [(adapter, 1.0)])
    before = snapshot(layer)
    record = fuse(layer, adapter)
    assert not layer.weight.is_contiguous()
    assert_within(layer.weight, reference, bound)
    unfuse(layer, record)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale_or_weight_is_a_config_error(bad: float) -> None:
    layer = make_layer("linear", torch.float32)
    adapter = make_adapter(layer)
    with pytest.raises(AdapterConfigError, match="scale must be finite"):
        fuse(layer, adapter, scale=bad)
    with pytest.raises(AdapterConfigError, match="weight of adapter 0"):
        fuse(layer, [(adapter, bad)])
    with pytest.raises(AdapterConfigError, match="no adapters"):
        fuse(layer, [])


def test_a_refusal_in_the_last_block_rolls_back_the_blocks_written_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import safemerge.merge.engine as engine

    monkeypatch.setattr(engine, "BLOCK_BYTES", 40 * 4 * 8)  # 8 rows a block: 5 blocks
    layer = make_layer("linear", torch.bfloat16, 40, 40)
    adapter = make_adapter(layer)
    adapter.lora_B[-1, 0] = float("inf")
    before = snapshot(layer)
    with pytest.raises(NonFiniteMergeError) as caught:
        fuse(layer, adapter)
    assert_unchanged(layer, before)
    assert caught.value.first_index[0] == 39


def _peak_growth_of_a_fuse(exact_unfuse: bool) -> tuple[int, int, int]:
    """Peak RSS growth (bytes) of fusing into a 64 MiB float32 weight, in a fresh process;
    the correction's size; and the further peak growth of unfusing it."""
    import subprocess

    # VmHWM is this process's own peak RSS (ru_maxrss would start at the parent's).
    script = f"""
import torch, safemerge
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
def warm_up():
    small = torch.nn.Linear(1024, 1024, bias=False)
    safemerge.fuse(small, safemerge.LoraAdapter(torch.randn(16, 1024), torch.randn(1024, 16)), exact_unfuse={exact_unfuse})
warm_up()
layer = torch.nn.Linear(4096, 4096, bias=False)
adapter = safemerge.LoraAdapter(torch.randn(16, 4096) * 0.01, torch.randn(4096, 16) * 0.01)
before = peak()
record = safemerge.fuse(layer, adapter, exact_unfuse={exact_unfuse})
after = peak()
safemerge.unfuse(layer, record, exact={exact_unfuse})
print((after - before) * 1024, record.nbytes, (peak() - after) * 1024)
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    growth, correction_bytes, unfuse_growth = (int(value) for value in completed.stdout.split())
    return growth, correction_bytes, unfuse_growth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_in_place_fuse_and_unfuse_hold_no_full_size_copy() -> None:
    weight_bytes = 4096 * 4096 * 4
    growth, correction_bytes, unfuse_growth = _peak_growth_of_a_fuse(exact_unfuse=True)
    assert correction_bytes <= weight_bytes / 8
    # Blocks of 2 MiB, their temporaries and the correction; a copy would be 64 MiB.
    assert growth < weight_bytes / 2, f"peak grew by {growth / 2**20:.1f} MiB for a 64 MiB weight"
    assert unfuse_growth < weight_bytes / 2, f"unfuse: {unfuse_growth / 2**20:.1f} MiB more"
    # Without exact_unfuse the fuse is in place too: its correction is the journal of a
    # rollback only, dropped at the end.
    plain_growth, _, arithmetic_unfuse_growth = _peak_growth_of_a_fuse(exact_unfuse=False)
    assert plain_growth < weight_bytes / 2, f"{plain_growth / 2**20:.1f} MiB"
    # The measurement can tell: an arithmetic unfuse fills a new full-size buffer (part of
    # its pages can come from memory freed since the fuse's peak, hence half, the same line
    # the no-copy assertions stay under).
    assert arithmetic_unfuse_growth > weight_bytes / 2, (
        f"{arithmetic_unfuse_growth / 2**20:.1f} MiB"
    )


def test_record_summary_states_what_undoing_costs() -> None:
    layer = make_layer("linear", torch.bfloat16, 64, 32)
    record = fuse(
        layer, [make_adapter(layer, rank=4), make_adapter(layer, rank=2, seed=1)], name="mlp.up"
    )
    summary = record.summary()
    assert summary.startswith("mlp.up (linear, bfloat16 32x64): fused rank 4+2 in ")
    assert f"exact-unfuse correction {record.nbytes:,} bytes" in summary
    assert f"{record.nbytes / record.weight_nbytes:.1%} of the weight" in summary
    assert (
        "no exact-unfuse correction"
        in fuse(layer, make_adapter(layer), exact_unfuse=False).summary()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_an_exception_midway_through_an_exact_unfuse_leaves_the_layer_fused(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    import safemerge.merge.engine as engine
    from safemerge.merge.correction import Correction

    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 4 * 8)  # 8 rows a block: many blocks
    layer = make_layer("linear", dtype, 64, 64)
    adapter = make_adapter(layer, magnitude=torch.rand(64) + 0.5)
    original = snapshot(layer)
    storage = layer.weight.untyped_storage().data_ptr()
    record = fuse(layer, adapter)
    fused = snapshot(layer)
    apply = Correction.apply
    calls = []

    def failing_apply(self: Correction, offset: int, unfused: torch.Tensor) -> torch.Tensor:
        calls.append(offset)
        if len(calls) == 4:
            raise KeyboardInterrupt("injected")
        return apply(self, offset, unfused)

    monkeypatch.setattr(Correction, "apply", failing_apply)
    with pytest.raises(KeyboardInterrupt):
        unfuse(layer, record)
    assert_unchanged(layer, fused)  # blocks already restored were fused again, exactly
    monkeypatch.setattr(Correction, "apply", apply)
    unfuse(layer, record)
    assert_unchanged(layer, original)
    assert layer.weight.untyped_storage().data_ptr() == storage


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_exception_midway_through_a_compiled_exact_unfuse_leaves_the_layer_fused(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, threads: int
) -> None:
    """The compiled kernel's path (no DoRA) restores blocks in place on several threads: an
    interrupt midway fuses the restored ones again, exactly."""
    import safemerge.merge.engine as engine

    if not kernel.compiled():
        pytest.skip("the compiled kernel is not built here")
    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 4 * 8)  # 8 rows a block: many blocks
    layer = make_layer("linear", dtype, 64, 64)
    adapter = make_adapter(layer)
    original = snapshot(layer)
    record = fuse(layer, adapter)
    fused = snapshot(layer)
    unfuse_block = kernel.unfuse_block
    calls = []

    def failing_unfuse_block(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("injected")
        return unfuse_block(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernel, "unfuse_block", failing_unfuse_block)
    with engine.pinned_threads(threads), pytest.raises(KeyboardInterrupt):
        unfuse(layer, record)
    assert_unchanged(layer, fused)  # blocks already restored were fused again, exactly
    monkeypatch.setattr(kernel, "unfuse_block", unfuse_block)
    unfuse(layer, record)
    assert_unchanged(layer, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e5m2])
def test_fuse_weight_on_a_bare_tensor_is_the_layer_fuse(dtype: torch.dtype) -> None:
    layer = make_layer("linear", dtype, 40, 24)
    adapter = make_adapter(layer)
    tensor = layer.weight.detach().clone()  # a plain tensor, not a Parameter
    before = bits(tensor)
    record = safemerge.fuse_weight(tensor, adapter, scale=0.5, name="w")
    fuse(layer, adapter, scale=0.5)
    assert torch.equal(bits(tensor), bits(layer.weight))
    assert record.layer == "w" and record.exact
    safemerge.unfuse_weight(tensor, record)
    assert torch.equal(bits(tensor), before)


def test_fuse_weight_transposed_and_refusals() -> None:
    generator = torch.Generator().manual_seed(0)
    stored = torch.randn(30, 20, generator=generator).half()  # (in, out), GPT-2 style
    adapter = LoraAdapter(
        torch.randn(4, 30, generator=generator),
        torch.randn(20, 4, generator=generator),
        fan_in_fan_out=True,
    )
    before = bits(stored)
    record = safemerge.fuse_weight(stored, adapter)
    expected = (
        before.view(torch.float16).double() + (adapter.lora_B.double() @ adapter.lora_A.double()).T
    )
    assert float((stored.double() - expected).abs().max()) < 0.05
    safemerge.unfuse_weight(stored, record)
    assert torch.equal(bits(stored), before)
    adapter.lora_A[-1, -1] = float("inf")
    with pytest.raises(NonFiniteMergeError):
        safemerge.fuse_weight(stored, adapter)
    assert torch.equal(bits(stored), before)
    with pytest.raises(safemerge.UnsupportedLayerError, match="2-D"):
        safemerge.fuse_weight(torch.zeros(3, 3, 3), adapter)
