"""The reproductions' tiny StableDiffusionPipeline (pytest_safemerge/pipelines.py, built
from configs: no download) with one random LoRA, "style", on the UNet's attention
projections and the text encoder's, loaded by ``pipe.load_lora_weights``."""

import logging
import warnings

import torch
from torch import nn

from pytest_safemerge import pipelines as tiny_pipelines

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def sd_pipeline_with_lora(dtype: torch.dtype, rank: int = 4):
    pipe = tiny_pipelines.sd_pipeline(dtype)
    generator = torch.Generator().manual_seed(0)
    state = {}
    targets = {
        "unet": tiny_pipelines.UNET_TARGETS,
        "text_encoder": tiny_pipelines.TEXT_ENCODER_TARGETS,
    }
    for component, suffixes in targets.items():
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, nn.Linear) and name.endswith(suffixes):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, rank, generator=generator) * 0.1
                state[f"{component}.{name}.lora_A.weight"] = down
                state[f"{component}.{name}.lora_B.weight"] = up
    pipe.load_lora_weights(state, adapter_name="style")
    return pipe


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """Every base (non-LoRA) tensor of the UNet and the text encoder, copied."""
    return {
        f"{component}.{name}": tensor.detach().clone()
        for component in ("unet", "text_encoder")
        for name, tensor in getattr(pipe, component).state_dict().items()
        if ".lora_" not in name
    }


def lora_scalings(pipe) -> dict[str, float]:
    return {
        f"{component}.{name}": module.scaling["style"]
        for component in ("unet", "text_encoder")
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "style" in module.scaling
    }
