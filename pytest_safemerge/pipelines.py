"""Tiny diffusers pipelines built from configs (no download): the pipeline suite's, and
the diffusers tests'.

Each builder returns a real pipeline of the named family with randomly initialised,
seeded weights, small enough that building one takes well under a second:

- :func:`sd_pipeline`: ``StableDiffusionPipeline`` (UNet2DConditionModel, one CLIP text
  encoder, a byte-level CLIP tokenizer, a VAE, DDIM);
- :func:`sdxl_pipeline`: ``StableDiffusionXLPipeline`` (a UNet with SDXL's text-time
  embedding, ``CLIPTextModel`` and ``CLIPTextModelWithProjection``);
- :func:`flux_pipeline`: ``FluxPipeline`` (a FluxTransformer2DModel with double- and
  single-stream blocks, CLIP and T5 encoders). Its tokenizers are ``None``: it runs from
  precomputed embeddings and cannot be saved and reloaded as a whole.

The SD and SDXL pipelines save with ``save_pretrained`` and load back with
``DiffusionPipeline.from_pretrained``. ``UNET_TARGETS`` / ``TEXT_ENCODER_TARGETS``
name the modules diffusers' own LoRA loaders target.
"""

from __future__ import annotations

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

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

#: The attention projections diffusers puts LoRAs on in a UNet or a transformer.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The CLIP text encoder's projections (diffusers' text-encoder LoRA targets).
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

#: Width of the text encoders' hidden states, and so of the UNet's cross attention.
TEXT_WIDTH = 16
#: Tokens per prompt.
MAX_TOKENS = 16


def clip_tokenizer(directory: Path | None = None) -> Any:
    """A real ``CLIPTokenizer`` over a byte-level vocabulary (every byte, with and without
    the end-of-word mark, and the two special tokens) and no merges: every prompt
    tokenizes, to one token per byte."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory = Path(tempfile.mkdtemp(prefix="clip-vocab-")) if directory is None else directory
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + "</w>" for symbol in symbols)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_TOKENS
    )


def _clip_config(*, projection: bool = False) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514,  # clip_tokenizer's vocabulary
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH if projection else 512,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def _unet(*, cross_attention_dim: int, sdxl: bool = False) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 * 4 + TEXT_WIDTH,
            "transformer_layers_per_block": (1, 2),
        }
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=2,
        **extra,
    )


def sd_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A tiny ``StableDiffusionPipeline`` in ``dtype``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    pipe: Any = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=clip_tokenizer(),
        unet=_unet(cross_attention_dim=TEXT_WIDTH),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(dtype)


def sdxl_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A tiny ``StableDiffusionXLPipeline`` in ``dtype`` (two text encoders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    pipe: Any = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection=True)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_unet(cross_attention_dim=2 * TEXT_WIDTH, sdxl=True),
        scheduler=EulerDiscreteScheduler(),
    )
    return pipe.to(dtype)


def flux_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A tiny ``FluxPipeline`` in ``dtype``; its tokenizers are ``None`` (see the module)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        axes_dims_rope=(2, 2, 4),
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=64, d_model=TEXT_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    clip = CLIPTextModel(_clip_config(projection=True))
    vae = _vae()
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=t5,
        tokenizer_2=None,
        transformer=transformer,
    )
    return pipe.to(dtype)


def unet_inputs(pipe: Any, seed: int = 0) -> dict[str, Any]:
    """Fixed inputs for one call of ``pipe.unet`` (or ``pipe.transformer``), in its dtype."""
    generator = torch.Generator().manual_seed(seed)
    if hasattr(pipe, "transformer") and pipe.transformer is not None:
        model = pipe.transformer
        dtype = model.dtype
        tokens, text = 8, 4
        return {
            "hidden_states": torch.randn(1, tokens, 16, generator=generator).to(dtype),
            "encoder_hidden_states": torch.randn(1, text, TEXT_WIDTH, generator=generator).to(
                dtype
            ),
            "pooled_projections": torch.randn(1, TEXT_WIDTH, generator=generator).to(dtype),
            "timestep": torch.tensor([0.5], dtype=dtype),
            "img_ids": torch.zeros(tokens, 3, dtype=dtype),
            "txt_ids": torch.zeros(text, 3, dtype=dtype),
            "return_dict": False,
        }
    unet = pipe.unet
    dtype = unet.dtype
    width = unet.config.cross_attention_dim
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, 4, 8, 8, generator=generator).to(dtype),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, MAX_TOKENS, width, generator=generator).to(dtype),
        "return_dict": False,
    }
    if unet.config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, TEXT_WIDTH, generator=generator).to(dtype),
            "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).to(dtype),
        }
    return inputs
