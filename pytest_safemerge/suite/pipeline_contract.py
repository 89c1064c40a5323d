"""The pipeline contract: a LoRA fuse across a diffusers pipeline's components.

``pytest --safemerge-pipeline=MODULE:OBJECT`` checks an object with::

    fuse_lora(pipe, lora_scale=1.0) -> None     # fuse the pipeline's LoRAs, all or nothing
    unfuse_lora(pipe) -> None                   # give the pipeline back

on tiny Stable Diffusion pipelines (:mod:`pytest_safemerge.pipelines`, from configs)
with a random LoRA on the UNet's attention projections and the text encoder's, loaded by
diffusers' own ``load_lora_weights``, one cell per property and dtype:

- ``test_pipeline_fuse_is_atomic[dtype]``: an Inf planted in the last LoRA layer of the
  text encoder (fused after the UNet by diffusers) must be refused, and every component
  left as it was: every tensor bit for bit, every LoRA layer's scaling and merged adapters;
- ``test_pipeline_unfuse_restores[dtype]``: ``fuse_lora(lora_scale=0.7)`` then
  ``unfuse_lora`` must give back every tensor bit for bit and every scaling.

The checks themselves are :func:`~pytest_safemerge.targets.diffusers_pipeline.check_fuse_atomicity`
and :func:`~pytest_safemerge.targets.diffusers_pipeline.check_unfuse_restores`, whose
verdicts list what differs. The layer contract cannot see either property: each layer may
be right while the pipeline is left half-fused.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pytest_safemerge.implementations import resolve_spec
from pytest_safemerge.options import Settings
from pytest_safemerge.results import start_row

#: The weight dtypes of the pipeline cells.
PIPELINE_DTYPES = ("float32", "float16", "bfloat16")
#: The scale of the round trip: not 1, so that a scaling left multiplied shows.
LORA_SCALE = 0.7


def load_pipeline_fuse(spec: str) -> Any:
    """The object ``MODULE:OBJECT`` names, checked to have ``fuse_lora`` and ``unfuse_lora``.

    Raises:
        pytest.UsageError: the module or object cannot be found, or lacks a method.
    """
    flag = f"--safemerge-pipeline={spec}"
    target = resolve_spec("--safemerge-pipeline", spec)
    attribute = spec.partition(":")[2]
    missing = [
        name for name in ("fuse_lora", "unfuse_lora") if not callable(getattr(target, name, None))
    ]
    if missing:
        raise pytest.UsageError(
            f"{flag}: {attribute} has no callable {' or '.join(missing)}; the pipeline "
            f"contract is fuse_lora(pipe, lora_scale=...) and unfuse_lora(pipe)"
        )
    return target


def _pipeline(dtype_name: str) -> Any:
    """A tiny SD pipeline in ``dtype_name`` with a random LoRA, built once per dtype."""
    if dtype_name not in _BUILT:
        import torch

        from pytest_safemerge import pipelines
        from pytest_safemerge.targets.diffusers_pipeline import load_random_lora

        pipe = pipelines.sd_pipeline(getattr(torch, dtype_name))
        targets: dict[str, tuple[str, ...]] = {
            "unet": pipelines.UNET_TARGETS,
            "text_encoder": pipelines.TEXT_ENCODER_TARGETS,
        }
        load_random_lora(pipe, targets)
        _BUILT[dtype_name] = pipe
    return copy.deepcopy(_BUILT[dtype_name])


_BUILT: dict[str, Any] = {}


@pytest.mark.parametrize("dtype", PIPELINE_DTYPES)
class PipelineConformanceSuite:
    """The pipeline contract's properties, one cell per property and dtype. Subclass it
    and override ``safemerge_pipeline_fuse`` to check your own object in your tests."""

    @pytest.fixture(scope="session")
    def safemerge_pipeline_fuse(self, safemerge_settings: Settings) -> Any:
        if safemerge_settings.pipeline is None:
            pytest.skip("no --safemerge-pipeline given")
        return load_pipeline_fuse(safemerge_settings.pipeline)

    def _row(self, request: pytest.FixtureRequest, prop: str, dtype: str) -> Any:
        settings: Settings = request.getfixturevalue("safemerge_settings")
        target = settings.pipeline or type(self).__name__
        return start_row(request.node, contract="pipeline", prop=prop, target=target, dtype=dtype)

    def test_pipeline_fuse_is_atomic(
        self, request: pytest.FixtureRequest, safemerge_pipeline_fuse: Any, dtype: str
    ) -> None:
        pytest.importorskip("diffusers")
        from pytest_safemerge.targets.diffusers_pipeline import (
            check_fuse_atomicity,
            plant_non_finite,
        )

        row = self._row(request, "fuse atomicity", dtype)
        pipe = _pipeline(dtype)
        broken = plant_non_finite(pipe, "text_encoder")
        row.example("inf")
        verdict = check_fuse_atomicity(
            pipe, lambda p: safemerge_pipeline_fuse.fuse_lora(p, lora_scale=LORA_SCALE)
        )
        assert verdict.passed, (
            f"[pipeline fuse atomicity] an Inf in {broken}'s LoRA, {dtype}: {verdict}"
        )

    def test_pipeline_unfuse_restores(
        self, request: pytest.FixtureRequest, safemerge_pipeline_fuse: Any, dtype: str
    ) -> None:
        pytest.importorskip("diffusers")
        from pytest_safemerge.targets.diffusers_pipeline import check_unfuse_restores

        row = self._row(request, "unfuse restores", dtype)
        row.example("random")
        verdict = check_unfuse_restores(
            _pipeline(dtype),
            lambda p: safemerge_pipeline_fuse.fuse_lora(p, lora_scale=LORA_SCALE),
            safemerge_pipeline_fuse.unfuse_lora,
        )
        assert verdict.passed, (
            f"[pipeline unfuse restores] fuse_lora(lora_scale={LORA_SCALE}) then unfuse_lora, "
            f"{dtype}: {verdict}"
        )
