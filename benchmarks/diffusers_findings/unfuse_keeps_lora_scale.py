"""diffusers' pipe.fuse_lora(lora_scale=s) multiplies every LoRA layer's scaling by s, and
pipe.unfuse_lora() does not divide it back: after the round trip the unfused LoRA acts at
s times its strength (and a second fuse_lora(lora_scale=s) fuses it at s * s).

diffusers/loaders/peft.py, PeftAdapterMixin._fuse_lora_apply (and
lora_base.fuse_text_encoder_lora): ``module.scale_layer(self.lora_scale)`` before
``module.merge``; _unfuse_lora_apply and unfuse_text_encoder_lora only ``unmerge()``.
Caught by pytest_safemerge.targets.diffusers_pipeline.check_unfuse_restores
(tests/pytest_safemerge/test_diffusers_pipeline.py).
"""

import sys

import torch
from _tiny_sd import lora_scalings, sd_pipeline_with_lora

pipe = sd_pipeline_with_lora(torch.float32)
before = lora_scalings(pipe)
pipe.fuse_lora(lora_scale=0.7, safe_fusing=True)
pipe.unfuse_lora()
after = lora_scalings(pipe)
changed = [key for key in before if before[key] != after[key]]
key = changed[0] if changed else next(iter(before))
print(f"{len(changed)} of {len(before)} LoRA scalings differ after fuse_lora(0.7) + unfuse_lora()")
print(f"e.g. {key}: {before[key]} -> {after[key]}")
sys.exit(1 if changed else 0)
