"""Pipeline-level checks (pytest_safemerge.targets.diffusers_pipeline) on diffusers' own
``pipe.fuse_lora(safe_fusing=True)`` / ``unfuse_lora()``, on the tiny SD pipeline in
float32 and bfloat16: they find diffusers' bugs (each reproduced in
``benchmarks/diffusers_findings/``), and pass a fuse that rolls back and an unfuse that
restores, so that a pass means something.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
logging.getLogger("diffusers").setLevel(logging.ERROR)

from pytest_safemerge import pipelines as tiny_pipelines  # noqa: E402
from pytest_safemerge.targets import diffusers_pipeline as checks  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
TARGETS = {"unet": tiny_pipelines.UNET_TARGETS, "text_encoder": tiny_pipelines.TEXT_ENCODER_TARGETS}


@pytest.fixture(scope="module")
def built() -> dict[torch.dtype, tuple[Any, int]]:
    """One tiny SD pipeline per dtype with a random LoRA "style" (building is the slow
    part: each test works on a deep copy), and how many layers the LoRA targets."""
    pipes = {}
    for dtype in DTYPES:
        pipe = tiny_pipelines.sd_pipeline(dtype)
        pipes[dtype] = (pipe, checks.load_random_lora(pipe, TARGETS))
    return pipes


@pytest.fixture(params=DTYPES, ids=str)
def pipe_and_layers(
    request: pytest.FixtureRequest, built: dict[torch.dtype, tuple[Any, int]]
) -> tuple[Any, int]:
    pipe, layers = built[request.param]
    return copy.deepcopy(pipe), layers


def _count(verdict: checks.Verdict, component: str, what: str) -> int:
    """The N of the verdict's line ``"<component>: N <what>"`` (0 when there is none)."""
    for line in verdict.differences:
        if line.startswith(f"{component}: ") and what in line:
            return int(line.split(": ", 1)[1].split(" ", 1)[0])
    return 0


def _layers_in(pipe: Any, component: str) -> int:
    return len(list(checks.lora_layers(getattr(pipe, component))))


def test_diffusers_fuse_commits_every_layer_before_the_broken_one(
    pipe_and_layers: tuple[Any, int],
) -> None:
    pipe, layers = pipe_and_layers
    unet, text_encoder = _layers_in(pipe, "unet"), _layers_in(pipe, "text_encoder")
    assert unet + text_encoder == layers
    broken = checks.plant_non_finite(pipe, "text_encoder")  # the last layer diffusers fuses

    verdict = checks.check_fuse_atomicity(pipe, checks.diffusers_fuse(lora_scale=0.7))

    assert not verdict.passed
    # A +Inf refused as "NaNs", naming the adapter, not the layer (benchmarks/
    # diffusers_findings/pipeline_fuse_not_atomic.py).
    assert verdict.error is not None and verdict.error.startswith("ValueError: NaNs detected")
    assert broken.split(".", 1)[1] not in verdict.error
    # Every layer before the broken one was fused and stays fused; every scaling is 0.7x.
    assert _count(verdict, "unet", "tensors differ (") == unet
    assert f"({unet} base, 0 LoRA)" in str(verdict)
    assert _count(verdict, "text_encoder", "tensors differ (") == text_encoder - 1
    assert _count(verdict, "unet", "LoRA scalings differ") == unet
    assert _count(verdict, "text_encoder", "LoRA scalings differ") == text_encoder
    assert "{'style': 1.0} -> {'style': 0.7}" in str(verdict)
    assert _count(verdict, "vae", "differ") == 0


def test_diffusers_unfuse_leaves_weights_and_scalings_changed(
    pipe_and_layers: tuple[Any, int],
) -> None:
    pipe, layers = pipe_and_layers

    verdict = checks.check_unfuse_restores(pipe, checks.diffusers_fuse(lora_scale=0.7))

    assert not verdict.passed and verdict.error is None
    # benchmarks/diffusers_findings/unfuse_keeps_lora_scale.py: no scaling divided back.
    scalings = _count(verdict, "unet", "LoRA scalings differ")
    assert scalings + _count(verdict, "text_encoder", "LoRA scalings differ") == layers
    # benchmarks/diffusers_findings/unfuse_not_exact.py: subtraction is no inverse.
    assert _count(verdict, "unet", "tensors differ (") > 0
    assert all(", 0 LoRA)" in line for line in verdict.differences if "tensors differ" in line)
    # Every adapter was unmerged: only values are wrong, not the bookkeeping.
    assert not any("merged adapters differ" in line for line in verdict.differences)


def _restore(pipe: Any, state: checks.PipelineState) -> None:
    """Put back every tensor, scaling and merged-adapter list of ``state``."""
    for name, saved in state.components.items():
        component = getattr(pipe, name)
        tensors = dict(component.named_parameters(remove_duplicate=False))
        tensors.update(component.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for key, tensor in tensors.items():
                tensor.copy_(saved.tensors[key])
        for key, layer in checks.lora_layers(component):
            layer.scaling.clear()
            layer.scaling.update(saved.scalings[key])
            layer.merged_adapters[:] = saved.merged[key]


def test_a_fuse_that_rolls_back_passes(pipe_and_layers: tuple[Any, int]) -> None:
    pipe, _ = pipe_and_layers
    checks.plant_non_finite(pipe, "text_encoder")

    def rolled_back(pipe: Any) -> None:
        state = checks.pipeline_state(pipe)
        try:
            checks.diffusers_fuse(lora_scale=0.7)(pipe)
        except ValueError:
            _restore(pipe, state)
            raise

    verdict = checks.check_fuse_atomicity(pipe, rolled_back)

    assert verdict.passed, str(verdict)
    assert verdict.error is not None and verdict.differences == ()


def test_an_unfuse_that_restores_passes(pipe_and_layers: tuple[Any, int]) -> None:
    pipe, _ = pipe_and_layers
    saved: list[checks.PipelineState] = []

    def fuse(pipe: Any) -> None:
        saved.append(checks.pipeline_state(pipe))
        checks.diffusers_fuse(lora_scale=0.7)(pipe)

    verdict = checks.check_unfuse_restores(pipe, fuse, lambda pipe: _restore(pipe, saved[-1]))

    assert verdict.passed, str(verdict)


def test_a_fuse_that_does_not_refuse_a_broken_adapter_fails(
    built: dict[torch.dtype, tuple[Any, int]],
) -> None:
    pipe = copy.deepcopy(built[torch.float32][0])
    checks.plant_non_finite(pipe, "unet")

    verdict = checks.check_fuse_atomicity(pipe, lambda pipe: None)

    assert not verdict.passed
    assert verdict.differences == ("the fuse did not refuse a broken adapter",)


def test_an_unfuse_check_without_a_lora_says_so(
    built: dict[torch.dtype, tuple[Any, int]],
) -> None:
    pipe = copy.deepcopy(built[torch.float32][0])
    pipe.unload_lora_weights()

    verdict = checks.check_unfuse_restores(pipe, lambda pipe: None, lambda pipe: None)

    assert not verdict.passed
    assert verdict.differences == ("the fuse changed nothing: load a LoRA first",)
    with pytest.raises(ValueError, match="holds no LoRA layer"):
        checks.plant_non_finite(pipe, "unet")
