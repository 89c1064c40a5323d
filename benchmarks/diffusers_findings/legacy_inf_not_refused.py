"""diffusers' legacy LoRA fuse with safe_fusing=True commits an Inf: it checks for NaN only.

diffusers/models/lora.py, LoRACompatibleLinear._fuse_lora (and LoRACompatibleConv's,
PatchedLoraProjection's): ``if safe_fusing and torch.isnan(fused_weight).any()``. An adapter
holding +Inf or -Inf (a training blow-up) makes the fused weight Inf, not NaN, so the
check passes and the Inf is written into the layer. Caught by the suite's refusal and
refusal-in-large-weights properties on DIFFUSERS_LEGACY, every weight dtype and layer kind.
"""

import sys
import warnings

import torch
from diffusers.models.lora import LoRACompatibleLinear, LoRALinearLayer

warnings.filterwarnings("ignore")
torch.manual_seed(0)
layer = LoRACompatibleLinear(4, 4, bias=False)
lora = LoRALinearLayer(4, 4, rank=2)
with torch.no_grad():
    lora.up.weight.normal_()
    lora.up.weight[0, 0] = float("inf")  # the adapter is broken
layer.set_lora_layer(lora)
try:
    layer._fuse_lora(lora_scale=1.0, safe_fusing=True)
    print("safe_fusing=True did not refuse")
except ValueError as error:
    print(f"refused: {error}")
infinite = int(torch.isinf(layer.weight).sum())
print(f"the layer's weight now holds {infinite} Inf of {layer.weight.numel()} elements")
sys.exit(1 if infinite else 0)
