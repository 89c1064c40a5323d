"""PEFT's safe merge into an 8-bit layer checks the float32 sum, but bitsandbytes
quantizes it through float16: a sum beyond 65504 turns its whole row into NaN.

peft/tuners/lora/bnb.py, Linear8bitLt.merge: ``torch.isfinite(w_data)`` on the float32
merge, then ``bnb.nn.Int8Params(w_data)``, whose quantization casts to float16 first
(bitsandbytes Int8Params._quantize): 60000 + 10000 = 70000 is Inf there, the row's scale
SCB becomes Inf and every weight of the row dequantizes to NaN. Not refused. Caught by the
suite's module-level refusal property on its int8 cast-overflow cases.
"""

import sys
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear8bitLt

warnings.filterwarnings("ignore")
torch.manual_seed(0)
weight = torch.randn(2, 64) * 0.1
weight[0, 0] = 60000.0
base = bnb.nn.Linear8bitLt(64, 2, bias=False, has_fp16_weights=False)
base.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
base = base.to("cpu")  # quantizes
config = LoraConfig(r=1, lora_alpha=1, init_lora_weights=False)
layer = Linear8bitLt(base, "default", config=config, r=1, lora_alpha=1)
layer.lora_A["default"].weight.data.zero_()
layer.lora_A["default"].weight.data[0, 0] = 10000.0
layer.lora_B["default"].weight.data.zero_()
layer.lora_B["default"].weight.data[0, 0] = 1.0
layer.merge(safe_merge=True)  # weight[0, 0] = 70000: finite in float32, not in float16
scales = base.weight.SCB.tolist()
with torch.no_grad():
    out = layer(torch.ones(1, 64))
print(f"safe merge accepted; row scales SCB = {scales}, output {out.tolist()}")
sys.exit(0 if torch.isfinite(out).all() else 1)
