"""diffusers' legacy LoRA fuse checks the float32 sum, then casts it to the weight's dtype
unchecked: a sum beyond float16's (or bfloat16's) range becomes Inf in the layer.

diffusers/models/lora.py, LoRACompatibleLinear._fuse_lora (and LoRACompatibleConv's): the
fuse is computed in float32, ``torch.isnan(fused_weight)`` is checked there, and
``fused_weight.to(dtype)`` is written without a check. 60000 + 10000 is finite in float32
and +Inf in float16. Caught by the suite's refusal properties (cast-overflow cases) on
DIFFUSERS_LEGACY in float16 and bfloat16, and by accuracy (a random case whose merge
overflows is returned without a refusal).
"""

import sys
import warnings

import torch
from diffusers.models.lora import LoRACompatibleLinear, LoRALinearLayer

warnings.filterwarnings("ignore")
layer = LoRACompatibleLinear(1, 1, bias=False).to(torch.float16)
lora = LoRALinearLayer(1, 1, rank=1, dtype=torch.float16)
with torch.no_grad():
    layer.weight.fill_(60000.0)
    lora.down.weight.fill_(1.0)
    lora.up.weight.fill_(10000.0)  # W + delta = 70000: finite in float32, not in float16
layer.set_lora_layer(lora)
try:
    layer._fuse_lora(lora_scale=1.0, safe_fusing=True)
    print("safe_fusing=True did not refuse")
except ValueError as error:
    print(f"refused: {error}")
value = layer.weight.item()
print(f"the float16 weight now holds {value} (60000 + 10000 = 70000 > 65504)")
sys.exit(1 if not torch.isfinite(layer.weight).all() else 0)
