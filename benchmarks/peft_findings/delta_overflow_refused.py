"""PEFT's safe merge refuses a finite merge when the delta alone overflows float16.

peft/tuners/lora/layer.py, Linear.merge: ``orig_weight += delta_weight.to(orig_dtype)``
casts the float32 delta to float16 first: a delta of 70000 becomes Inf, although
W + delta = -60000 + 70000 = 10000 fits float16, and the merge is refused as "NaNs
detected". The suite's accuracy property ("a finite merge is not refused") would catch
it: its delta-overflow cases (`test_fuse_is_accurate[float16]`, `[bfloat16]`) show it.
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
base = nn.Sequential(nn.Linear(1, 1, bias=False)).to(torch.float16)
base[0].weight.data.fill_(-60000.0)
config = LoraConfig(r=1, lora_alpha=1, target_modules=["0"], init_lora_weights=False)
layer = get_peft_model(base, config).base_model.model[0]  # adapters kept in float32
layer.lora_A["default"].weight.data.fill_(70000.0)
layer.lora_B["default"].weight.data.fill_(1.0)
try:
    layer.merge(safe_merge=True)
except ValueError as error:
    print(f"refused a merge whose result, -60000 + 70000 = 10000, fits float16: {error}")
    sys.exit(1)
print(f"merged: {layer.base_layer.weight.item()}")
