"""diffusers' pipe.fuse_lora(safe_fusing=True) is not all-or-nothing across a pipeline: a
broken LoRA layer is refused after every layer before it was fused, and the pipeline is
left half-merged; the refusal says "NaNs" for an Inf and names no layer.

diffusers/loaders/lora_base.py, LoraBaseMixin.fuse_lora: each component in turn
(ModelMixin.fuse_lora, then fuse_text_encoder_lora) calls PEFT's merge(safe_merge=True)
layer by layer, and each layer commits before the next is checked; nothing is undone when
one raises. The lora_scale is applied to each layer's scaling before its merge, and stays.
Caught by pytest_safemerge.targets.diffusers_pipeline.check_fuse_atomicity
(tests/pytest_safemerge/test_diffusers_pipeline.py), float32 and bfloat16.
"""

import sys

import torch
from _tiny_sd import base_weights, lora_scalings, sd_pipeline_with_lora

changed = 0
for dtype in (torch.float32, torch.bfloat16):
    pipe = sd_pipeline_with_lora(dtype)
    *_, (name, last) = (
        (name, module)
        for name, module in pipe.text_encoder.named_modules()
        if isinstance(getattr(module, "scaling", None), dict)
    )
    with torch.no_grad():
        last.lora_B["style"].weight[0, 0] = float("inf")  # the text encoder's last LoRA layer
    weights, scalings = base_weights(pipe), lora_scalings(pipe)
    try:
        pipe.fuse_lora(lora_scale=0.7, safe_fusing=True)
        print(f"{dtype}: not refused")
    except ValueError as error:
        print(f"{dtype}: refused ({error}; the broken layer is text_encoder.{name})")
    after, scaled = base_weights(pipe), lora_scalings(pipe)
    fused = [key for key in weights if not torch.equal(weights[key], after[key])]
    rescaled = [key for key in scalings if scalings[key] != scaled[key]]
    print(f"  after the refusal: {len(fused)} base tensors fused, {len(rescaled)} scalings changed")
    changed += len(fused) + len(rescaled)
sys.exit(1 if changed else 0)
