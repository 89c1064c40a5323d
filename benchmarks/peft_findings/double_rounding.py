"""PEFT rounds the LoRA delta to the weight's dtype before adding it: two roundings, not one.

peft/tuners/lora/layer.py, Linear.merge (and Embedding.merge, _ConvNd.merge, and every
unmerge): ``orig_weight += delta_weight.to(orig_dtype)``. In bfloat16 or float16 the delta
is rounded, then the sum is rounded again, so the merged weight is often not the nearest
value to W + delta; where W and delta nearly cancel, the error is many ulps of the result.
The same happens in get_delta_weight (a delta rounded to the adapter's dtype when the
adapter is stored in half precision) and so in the DoRA merge and unmerge (variants.py).
Caught by the suite's accuracy property and stacked round trip (tensor contract), and by
the module-level accuracy (every unquantized layer kind) and round trip (DoRA).
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
base = nn.Sequential(nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
config = LoraConfig(r=8, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
layer = get_peft_model(base, config).base_model.model[0]  # adapters kept in float32
weight = layer.base_layer.weight.detach().clone()
delta = layer.get_delta_weight("default")  # float32
layer.merge(safe_merge=True)
merged = layer.base_layer.weight.detach()
once = (weight.float() + delta).to(torch.bfloat16)  # the float32 sum, rounded once
wrong = merged != once
i = int((merged.double() - (weight.double() + delta.double())).abs().argmax())
w, d, m, r = (t.reshape(-1)[i].item() for t in (weight, delta, merged, once))
print(
    f"{int(wrong.sum())} of {wrong.numel()} merged bfloat16 weights are not W + delta rounded once"
)
print(f"worst: W={w!r} delta={d!r} exact={w + d!r}: PEFT {m!r}, rounded once {r!r}")
sys.exit(1 if wrong.any() else 0)
