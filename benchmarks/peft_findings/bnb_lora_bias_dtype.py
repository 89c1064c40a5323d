"""PEFT's merge into a bitsandbytes layer turns a float16 bias into a float32 one.

peft/tuners/lora/bnb.py, Linear8bitLt.merge and Linear4bit.merge: ``bias_data =
base_layer.bias.data + lora_B.bias`` promotes a float16 bias plus a float32 lora bias (PEFT
keeps adapters in float32) to float32, and ``base_layer.bias.data = bias_data`` stores it
as such: the merged layer no longer has the dtypes of the layer it came from. (Under
safe_merge=True only a one-output layer gets this far: bnb_lora_bias_safe_merge.py.)
Caught by the suite's module-level form property on int8 lora-bias cases.
"""

import sys
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear8bitLt

warnings.filterwarnings("ignore")
torch.manual_seed(0)
base = bnb.nn.Linear8bitLt(64, 4, has_fp16_weights=False)
base.weight = bnb.nn.Int8Params(
    torch.randn(4, 64) * 0.1, requires_grad=False, has_fp16_weights=False
)
base.bias = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16), requires_grad=False)
base = base.to("cpu")  # quantizes
config = LoraConfig(r=2, lora_alpha=2, lora_bias=True, init_lora_weights=False)
layer = Linear8bitLt(base, "default", config=config, r=2, lora_alpha=2)
layer.lora_B["default"].float()  # as PEFT keeps adapters (autocast_adapter_dtype=True)
layer.merge()
print(f"bias dtype before the merge: torch.float16, after: {base.bias.dtype}")
sys.exit(0 if base.bias.dtype == torch.float16 else 1)
