"""PEFT's safe merge checks the merged LoRA bias in float32, then casts it to float16 unchecked.

peft/tuners/lora/layer.py, Linear.merge (and _ConvNd.merge): ``new_bias = base_layer.bias
+ lora_B.bias * scaling`` is float32 (the adapter is float32), ``torch.isfinite(new_bias)``
passes, and ``base_layer.bias.data = new_bias.to(orig_dtype)`` overflows to Inf: 60000 +
10000 is finite in float32, not in float16. Caught by the suite's module-level refusal
property on its lora-bias cases.
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
base = nn.Sequential(nn.Linear(2, 2)).to(torch.float16)
base[0].bias.data.fill_(60000.0)
config = LoraConfig(
    r=1, lora_alpha=1, target_modules=["0"], lora_bias=True, init_lora_weights=False
)
layer = get_peft_model(base, config).base_model.model[0]  # adapters kept in float32
layer.lora_B["default"].weight.data.zero_()
layer.lora_B["default"].bias.data.fill_(10000.0)
layer.merge(safe_merge=True)
bias = layer.base_layer.bias.detach()
print(f"safe merge accepted; the float16 bias is now {bias.tolist()}")
sys.exit(0 if torch.isfinite(bias).all() else 1)
