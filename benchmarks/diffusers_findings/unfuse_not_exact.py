"""diffusers' pipe.unfuse_lora() does not give the base weights back: it subtracts the
delta again (PEFT's unmerge), so float32 and bfloat16 weights come back off by an ulp or
more (in bfloat16 the delta is also rounded before the subtraction).

diffusers/loaders/lora_base.py, LoraBaseMixin.unfuse_lora -> each LoRA layer's
``unmerge()`` (peft/tuners/lora/layer.py: ``weight.data -= delta_weight``); no copy or
correction of the original bits is kept by fuse_lora. Caught by
pytest_safemerge.targets.diffusers_pipeline.check_unfuse_restores
(tests/pytest_safemerge/test_diffusers_pipeline.py), float32 and bfloat16.
"""

import sys

import torch
from _tiny_sd import base_weights, sd_pipeline_with_lora

differ = 0
for dtype in (torch.float32, torch.bfloat16):
    pipe = sd_pipeline_with_lora(dtype)
    before = base_weights(pipe)
    pipe.fuse_lora(lora_scale=1.0, safe_fusing=True)
    pipe.unfuse_lora()
    after = base_weights(pipe)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    worst = max(
        ((after[key].double() - before[key].double()).abs().max().item() for key in changed),
        default=0.0,
    )
    print(
        f"{dtype}: {len(changed)} base tensors differ after fuse_lora() + unfuse_lora() "
        f"(largest change {worst:.3g})"
    )
    differ += len(changed)
sys.exit(1 if differ else 0)
