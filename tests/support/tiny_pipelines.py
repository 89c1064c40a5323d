"""The tiny diffusers pipelines of the plugin (:mod:`pytest_safemerge.pipelines`), under the
name the tests import them by."""

from pytest_safemerge.pipelines import (
    MAX_TOKENS,
    TEXT_ENCODER_TARGETS,
    TEXT_WIDTH,
    UNET_TARGETS,
    clip_tokenizer,
    flux_pipeline,
    sd_pipeline,
    sdxl_pipeline,
    unet_inputs,
)

__all__ = [
    "MAX_TOKENS",
    "TEXT_ENCODER_TARGETS",
    "TEXT_WIDTH",
    "UNET_TARGETS",
    "clip_tokenizer",
    "flux_pipeline",
    "sd_pipeline",
    "sdxl_pipeline",
    "unet_inputs",
]
