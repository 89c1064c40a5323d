"""PEFT merges a bitsandbytes layer's LoRA bias without the adapter's scaling.

peft/tuners/lora/bnb.py, Linear4bit.merge and Linear8bitLt.merge (and their unmerge):
``bias_data = base_layer.bias.data + lora_B.bias`` where the plain layers add
``lora_B.bias * scaling``, and the forward adds ``lora_B(lora_A(x)) * scaling``. With
scaling 2, the merged layer's output is off by the LoRA bias. (With safe_merge=True the
merge first hits bnb_lora_bias_safe_merge.py, so this runs the unsafe merge.) Caught by
the suite's module-level accuracy property on nf4/fp4/int8 lora-bias cases.
"""

import sys
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear4bit

warnings.filterwarnings("ignore")
torch.manual_seed(0)
base = bnb.nn.Linear4bit(64, 4, quant_type="nf4", compute_dtype=torch.float32)
base.weight = bnb.nn.Params4bit(torch.randn(4, 64) * 0.1, requires_grad=False, quant_type="nf4")
base = base.to("cpu")  # quantizes
config = LoraConfig(r=2, lora_alpha=4, lora_bias=True, init_lora_weights=False)  # scaling 2
layer = Linear4bit(base, "default", config=config, r=2, lora_alpha=4)
layer.lora_B["default"].weight.data.zero_()  # only the LoRA bias: no requantization involved
layer.lora_B["default"].bias.data.fill_(1.0)
x = torch.randn(1, 64)
with torch.no_grad():
    unmerged = layer(x)  # base(x) + 2 * 1.0
    layer.merge()
    merged = layer(x)
gap = (merged - unmerged).abs().max().item()
print(f"scaling {layer.scaling['default']}: merged output differs from the unmerged by {gap:.4f}")
sys.exit(1 if gap > 1e-3 else 0)
