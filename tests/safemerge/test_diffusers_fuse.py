"""safemerge.diffusers: fuse_lora / unfuse_lora on real tiny diffusers pipelines.

The reference is diffusers' own ``pipe.fuse_lora(safe_fusing=True)`` on an identical
pipeline. Both fuse the same coefficient (``scaling * lora_scale``, scaled by PEFT's own
``scale_layer``), so the fused weights differ only by rounding, bounded element by element
from the arithmetic (see :func:`_diffusers_bound`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

import safemerge
import safemerge.diffusers
from pytest_safemerge import pipelines as tiny_pipelines
from safemerge.merge.bounds import merge_bound_parts
from safemerge.merge.numerics import ulp

pytestmark = pytest.mark.filterwarnings("ignore")

BUILDERS: dict[str, Callable[..., Any]] = {
    "sd": tiny_pipelines.sd_pipeline,
    "sdxl": tiny_pipelines.sdxl_pipeline,
    "flux": tiny_pipelines.flux_pipeline,
}
LORA_SCALE = 0.7


def _pipeline(kind: str, dtype: torch.dtype, adapters: tuple[str, ...] = ("a",)) -> Any:
    """A tiny pipeline with seeded random LoRAs on the denoiser and every text encoder
    with CLIP attention (PEFT's own add_adapter / inject_adapter_in_model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = BUILDERS[kind](dtype)
        denoiser = pipe.transformer if kind == "flux" else pipe.unet
        for position, name in enumerate(adapters):
            torch.manual_seed(100 + position)
            alpha = 8 + 4 * position
            config = LoraConfig(
                r=4,
                lora_alpha=alpha,
                target_modules=list(tiny_pipelines.UNET_TARGETS),
                init_lora_weights=False,
            )
            denoiser.add_adapter(config, adapter_name=name)
            for component in _text_encoders(pipe):
                text_config = LoraConfig(
                    r=4,
                    lora_alpha=alpha,
                    target_modules=["q_proj", "v_proj"],
                    init_lora_weights=False,
                )
                inject_adapter_in_model(text_config, component, adapter_name=name)
        _randomise_b(pipe)
    return pipe


def _text_encoders(pipe: Any) -> list[Any]:
    names = [n for n in pipe._lora_loadable_modules if n.startswith("text_encoder")]
    return [
        getattr(pipe, n)
        for n in names
        if any(m.endswith("q_proj") for m, _ in getattr(pipe, n).named_modules())
    ]


def _randomise_b(pipe: Any) -> None:
    """PEFT's random init gives lora_B small values; make them matter in every dtype."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in _lora_layers(pipe):
            for name, module in layer.lora_B.items():
                weight = module.weight
                noise = torch.randn(weight.shape, generator=generator) * 0.5
                weight.copy_(noise.to(weight.dtype))
                del name


def _components(pipe: Any) -> dict[str, torch.nn.Module]:
    return {
        name: getattr(pipe, name)
        for name in pipe._lora_loadable_modules
        if isinstance(getattr(pipe, name, None), torch.nn.Module)
    }


def _lora_layers(pipe: Any) -> list[tuple[str, Any]]:
    return [
        (f"{component}.{name}", module)
        for component, model in _components(pipe).items()
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    ]


def _state(pipe: Any) -> dict[str, Any]:
    """Everything a fuse may touch: every tensor of every component (bits, device), and
    every LoRA layer's scaling and merged adapters, and the pipeline's fused_loras."""
    state: dict[str, Any] = {}
    for component, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            tensors = [*model.named_parameters(), *model.named_buffers()]
            for name, tensor in tensors:
                state[f"{component}.{name}"] = (tensor.detach().clone(), tensor.device)
    for name, layer in _lora_layers(pipe):
        state[f"{name}:scaling"] = dict(layer.scaling)
        state[f"{name}:merged"] = list(layer.merged_adapters)
    state["fused_loras"] = set(pipe.fused_loras)
    return state


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    __tracebackhide__ = True
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple):
            (tensor, device), (other_tensor, other_device) = value, other
            assert device == other_device, key
            assert _bits(tensor).equal(_bits(other_tensor)), f"{key} changed"
        else:
            assert value == other, f"{key}: {value} != {other}"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN-safe: equal NaNs compare equal)."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.contiguous().view(torch.uint8)


def _diffusers_bound(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, coefficient: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge and the bound on diffusers' (PEFT's) fused weight, float64.

    PEFT on the CPU computes the delta in float32 (``B @ A * scaling``: ``rank + 1``
    roundings, within ``merge_bound_parts``'s ``gamma_(rank + 2)``), rounds it to the
    weight's dtype (half an ulp: the bound on ``delta`` below), then adds it to the weight
    in that dtype: one more rounding, half an ulp of the dtype at ``|y| + bound_delta``, and
    for half dtypes the float32 sum of the two may round first (half a float32 ulp more).
    """
    zero = torch.zeros_like(weight, dtype=torch.float32)
    delta, _, delta_bound = merge_bound_parts(zero, [(lora_B, lora_A, coefficient)], weight.dtype)
    merged = weight.to(torch.float64) + delta
    magnitude = merged.abs() + delta_bound
    add = ulp(magnitude, weight.dtype) / 2
    if weight.dtype != torch.float32:
        add = add + ulp(magnitude, torch.float32) / 2
    return merged, delta_bound + add


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("sd", torch.float32),
        ("sd", torch.float16),
        ("sd", torch.bfloat16),
        ("sdxl", torch.bfloat16),
        ("flux", torch.float16),
        ("flux", torch.bfloat16),
    ],
)
def test_fused_weights_agree_with_diffusers_within_the_bound(kind: str, dtype: torch.dtype) -> None:
    ours, theirs = _pipeline(kind, dtype), _pipeline(kind, dtype)
    expected = {}
    for name, layer in _lora_layers(ours):
        pair = (safemerge.LoraAdapter(layer.lora_A["a"].weight, layer.lora_B["a"].weight), 1.0)
        coefficient = layer.scaling["a"] * LORA_SCALE
        reference, our_bound = safemerge.expected_fuse(
            layer.get_base_layer(), [pair], scale=LORA_SCALE * layer.scaling["a"]
        )
        _, their_bound = _diffusers_bound(
            layer.get_base_layer().weight,
            layer.lora_A["a"].weight,
            layer.lora_B["a"].weight,
            coefficient,
        )
        expected[name] = (reference, our_bound, their_bound)

    report = safemerge.diffusers.fuse_lora(ours, lora_scale=LORA_SCALE)
    theirs.fuse_lora(components=list(_components(theirs)), lora_scale=LORA_SCALE, safe_fusing=True)

    assert len(report.layers) == len(expected)
    assert ours.fused_loras == theirs.fused_loras == {"a"}
    their_layers = dict(_lora_layers(theirs))
    for name, layer in _lora_layers(ours):
        reference, our_bound, their_bound = expected[name]
        mine = layer.get_base_layer().weight.to(torch.float64)
        other = their_layers[name].get_base_layer().weight.to(torch.float64)
        assert ((mine - reference).abs() <= our_bound).all(), name
        assert ((mine - other).abs() <= our_bound + their_bound).all(), name
        assert layer.merged_adapters == their_layers[name].merged_adapters == ["a"]
        assert layer.scaling == their_layers[name].scaling  # both scaled by lora_scale


def test_fused_output_agrees_with_diffusers() -> None:
    """The UNet's output from both fuses differs by no more than a random perturbation of
    every fused weight by its bound moves it (float32, where the forward is exact enough
    for the comparison to see a wrong coefficient or a missed layer)."""
    ours, theirs = _pipeline("sd", torch.float32), _pipeline("sd", torch.float32)
    bounds = {}
    for name, layer in _lora_layers(ours):
        base = layer.get_base_layer()
        pair = (safemerge.LoraAdapter(layer.lora_A["a"].weight, layer.lora_B["a"].weight), 1.0)
        coefficient = layer.scaling["a"] * LORA_SCALE
        _, ours_bound = safemerge.expected_fuse(base, [pair], scale=coefficient)
        _, theirs_bound = _diffusers_bound(
            base.weight, layer.lora_A["a"].weight, layer.lora_B["a"].weight, coefficient
        )
        bounds[name] = ours_bound + theirs_bound
    safemerge.diffusers.fuse_lora(ours, lora_scale=LORA_SCALE)
    theirs.fuse_lora(components=["unet", "text_encoder"], lora_scale=LORA_SCALE, safe_fusing=True)
    inputs = tiny_pipelines.unet_inputs(ours)
    with torch.no_grad():
        mine = ours.unet(**inputs)[0]
        other = theirs.unet(**inputs)[0]
        generator = torch.Generator().manual_seed(3)
        for name, layer in _lora_layers(theirs):
            if name.startswith("unet."):
                weight = layer.get_base_layer().weight
                signs = torch.randint(0, 2, weight.shape, generator=generator) * 2 - 1
                weight += (signs * bounds[name]).to(weight.dtype)
        perturbed = theirs.unet(**inputs)[0]
    assert (mine - other).abs().max() <= (perturbed - other).abs().max()
    assert not torch.equal(perturbed, other)  # the perturbation is seen at all


@pytest.mark.parametrize(
    ("component", "layer_index", "value"),
    [("unet", 0, float("nan")), ("text_encoder", -1, float("inf")), ("unet", -1, float("-inf"))],
)
def test_non_finite_anywhere_is_refused_and_changes_nothing(
    component: str, layer_index: int, value: float
) -> None:
    pipe = _pipeline("sd", torch.bfloat16)
    layers = [(n, m) for n, m in _lora_layers(pipe) if n.startswith(component + ".")]
    name, layer = layers[layer_index]
    with torch.no_grad():
        layer.lora_A["a"].weight[1, 2] = value
    before = _state(pipe)
    with pytest.raises(safemerge.NonFiniteMergeError) as raised:
        safemerge.diffusers.fuse_lora(pipe, lora_scale=LORA_SCALE)
    error = raised.value
    assert error.layer == f"{name}.weight"
    assert error.bad_count > 0
    counts = (error.nan_count, error.posinf_count + error.neginf_count)
    assert counts[0] > 0 if value != value else counts[1] > 0
    _assert_same_state(before, _state(pipe))


def test_unfuse_restores_every_bit_scaling_and_device_with_several_adapters() -> None:
    pipe = _pipeline("sdxl", torch.bfloat16, adapters=("a", "b"))
    pipe.set_adapters(["a", "b"], [0.6, 1.3])
    before = _state(pipe)
    adapter_tensors = {
        name: [p for n, p in layer.named_parameters() if "lora_" in n]
        for name, layer in _lora_layers(pipe)
    }
    report = safemerge.diffusers.fuse_lora(pipe, lora_scale=LORA_SCALE, offload_adapters=True)
    assert pipe.fused_loras == {"a", "b"} and pipe.num_fused_loras == 2
    assert all(record.exact for record in report.records.values())
    fused = _state(pipe)
    changed = [k for k, v in before.items() if isinstance(v, tuple) and not v[0].equal(fused[k][0])]
    assert changed and all(k.endswith("base_layer.weight") for k in changed)
    for name, layer in _lora_layers(pipe):
        assert layer.merged_adapters == ["a", "b"]
        assert layer.scaling == {a: s * LORA_SCALE for a, s in before[f"{name}:scaling"].items()}
        assert all(p.device == safemerge.diffusers.OFFLOAD_DEVICE for p in adapter_tensors[name])

    safemerge.diffusers.unfuse_lora(pipe)

    _assert_same_state(before, _state(pipe))
    for name, layer in _lora_layers(pipe):  # the same Parameters, back where they were
        assert [p for n, p in layer.named_parameters() if "lora_" in n] == adapter_tensors[name]


def test_diffusers_own_unfuse_is_not_exact() -> None:
    """The bug this replaces: subtracting again moves bfloat16 bits and keeps the scaling."""
    pipe = _pipeline("sd", torch.bfloat16)
    before = _state(pipe)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=LORA_SCALE)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    after = _state(pipe)
    moved = [k for k, v in before.items() if isinstance(v, tuple) and not v[0].equal(after[k][0])]
    rescaled = [k for k, v in before.items() if k.endswith(":scaling") and v != after[k]]
    assert moved and rescaled


def test_unfuse_refuses_after_diffusers_own_unfuse() -> None:
    pipe = _pipeline("sd", torch.float16)
    safemerge.diffusers.fuse_lora(pipe)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    before = _state(pipe)
    with pytest.raises(safemerge.RestoreError, match="changed since safemerge fused"):
        safemerge.diffusers.unfuse_lora(pipe)
    _assert_same_state(before, _state(pipe))


def test_unknown_components_and_adapters_are_refused_before_any_change() -> None:
    pipe = _pipeline("sd", torch.float32)
    before = _state(pipe)
    with pytest.raises(safemerge.ModelFuseError) as raised:
        safemerge.diffusers.fuse_lora(pipe, components=["unet", "vae_decoder"])
    assert raised.value.layers == ("vae_decoder",)
    with pytest.raises(
        safemerge.ModelFuseError, match=r"no LoRA layer has the adapter\(s\) \['z'\]"
    ):
        safemerge.diffusers.fuse_lora(pipe, adapter_names=["a", "z"], lora_scale=0.5)
    with pytest.raises(TypeError, match="single model"):
        safemerge.diffusers.fuse_lora(pipe.unet, components=["unet"])
    _assert_same_state(before, _state(pipe))


def test_one_model_and_diffusers_unload_keeps_the_fused_weights() -> None:
    pipe = _pipeline("sd", torch.float32)
    safemerge.diffusers.fuse_lora(pipe.unet, lora_scale=LORA_SCALE, adapter_names="a")
    assert all(
        layer.merged_adapters == ["a"] for n, layer in _lora_layers(pipe) if n.startswith("unet.")
    )
    assert all(
        not layer.merged_adapters
        for n, layer in _lora_layers(pipe)
        if n.startswith("text_encoder.")
    )
    fused = {
        n: layer.get_base_layer().weight.clone()
        for n, layer in _lora_layers(pipe)
        if n.startswith("unet.")
    }
    pipe.unload_lora_weights()
    unet = dict(pipe.unet.named_modules())
    for name, weight in fused.items():
        assert torch.equal(unet[name.removeprefix("unet.")].weight, weight)


@pytest.mark.parametrize(
    ("load", "torch_threads", "expected"),
    # The caller's own thread is one unit of the load: 1.0 is an idle machine.
    [(0.0, 4, 4), (1.0, 4, 4), (2.0, 4, 3), (3.6, 4, 1), (40.0, 4, 1), (0.0, 1, 1)],
)
def test_merge_threads_are_the_cores_others_leave_idle(
    monkeypatch: pytest.MonkeyPatch, load: float, torch_threads: int, expected: int
) -> None:
    from safemerge.peft import threads

    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(threads, "_usable_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
    assert threads.merge_threads() == expected


def test_a_fuse_on_a_busy_machine_runs_one_thread_and_still_unfuses_every_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The thread count is the fuse's to choose: the records keep it, the unfuse repeats it."""
    from safemerge.peft import threads

    pipe = _pipeline("sd", torch.bfloat16)
    before = _state(pipe)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
        report = safemerge.diffusers.fuse_lora(pipe, lora_scale=LORA_SCALE)
        assert {record.num_threads for record in report.records.values()} == {1}
        assert torch.get_num_threads() == 2  # the caller's setting, back after the fuse
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        safemerge.diffusers.unfuse_lora(pipe)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(torch_threads)
    _assert_same_state(before, _state(pipe))
