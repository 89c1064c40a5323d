"""PEFT's safe merge into a bitsandbytes layer with lora_bias raises after it replaced the weight.

peft/tuners/lora/bnb.py, Linear4bit.merge and Linear8bitLt.merge: the quantized weight is
replaced first, then ``if safe_merge and not torch.isfinite(bias_data):`` (no ``.all()``)
raises "Boolean value of Tensor with more than one value is ambiguous" for any bias of
more than one element. The layer is left merged but not marked merged (merged_adapters is
empty, so unmerge() cannot undo it, and the forward adds the adapter a second time).
Caught by the suite's module-level refusal and atomicity properties on nf4/fp4/int8 lora-bias cases.
"""

import sys
import warnings

import bitsandbytes as bnb
import torch
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

warnings.filterwarnings("ignore")
torch.manual_seed(0)
weight = torch.randn(4, 64) * 0.1
layers = {
    "Linear4bit": (Linear4bit, bnb.nn.Linear4bit(64, 4, quant_type="nf4")),
    "Linear8bitLt": (Linear8bitLt, bnb.nn.Linear8bitLt(64, 4, has_fp16_weights=False)),
}
layers["Linear4bit"][1].weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
layers["Linear8bitLt"][1].weight = bnb.nn.Int8Params(
    weight, requires_grad=False, has_fp16_weights=False
)
broken = False
for name, (lora_class, base) in layers.items():
    base = base.to("cpu")  # quantizes
    before = base.weight.data.clone()
    config = LoraConfig(r=2, lora_alpha=2, lora_bias=True, init_lora_weights=False)
    layer = lora_class(base, "default", config=config, r=2, lora_alpha=2)
    try:
        layer.merge(safe_merge=True)
    except RuntimeError as error:
        changed = not torch.equal(base.weight.data, before)
        print(
            f"{name}: {error}; weight already replaced: {changed}; merged_adapters: {layer.merged_adapters}"
        )
        broken = True
sys.exit(1 if broken else 0)
