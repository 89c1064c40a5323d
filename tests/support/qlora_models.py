"""A tiny Llama directory and PEFT adapters for the quantized-export tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: The projections the adapters adapt; the others are quantized unadapted.
TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny_llama(directory: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A one-layer Llama (hidden 64, MLP 128) saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(directory)
    return directory


def peft_adapter(base: Path, directory: Path, *, factor: float = 1.0) -> Path:
    """A rank-4 LoRA on :data:`TARGETS`, injected with PEFT, ``lora_B`` scaled by ``factor``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(directory)
    if factor != 1.0:
        scaled(directory, directory, factor)
    return directory


def scaled(source: Path, directory: Path, factor: float, *, nan: bool = False) -> Path:
    """A copy of a PEFT adapter with every ``lora_B`` times ``factor`` (and, with ``nan``,
    the last element of the last ``lora_A`` NaN)."""
    directory.mkdir(exist_ok=True)
    tensors = load_file(source / "adapter_model.safetensors")
    for name in tensors:
        if "lora_B" in name:
            tensors[name] = tensors[name] * factor
    if nan:
        last = sorted(name for name in tensors if "lora_A" in name)[-1]
        tensors[last] = tensors[last].clone()
        tensors[last][-1, -1] = float("nan")
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
