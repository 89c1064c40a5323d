"""PEFT rounds the delta to the adapter's dtype: a float16 adapter on a float32 weight.

peft/tuners/lora/layer.py, Linear.get_delta_weight: on the CPU a float16 or bfloat16
adapter is upcast to float32 for the product (``cast_to_fp32``), and the product is cast
back to the adapter's dtype (``output_tensor.to(dtype=dtype)``) before it is added to the
weight. The float32 weight gets a delta rounded to float16: an error of up to 2**-11 of
the delta where a float32 merge errs by 2**-24, and a delta past 65504 becomes Inf, so
a merge whose result fits float32 is refused as "NaNs detected". (Off the CPU the product
itself is computed in the adapter's dtype.) The suite's accuracy cells with float16 or
bfloat16 adapters show both (`test_fuse_is_accurate[float32]`,
`test_fuse_layer_is_accurate[linear-float32]`).
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
failed = False
# (lora_A, lora_B) values, each exact in float16; their product is not.
for a, b, what in ((1 + 2**-10, 1 + 2**-10, "rounded"), (300.0, 300.0, "overflowed")):
    base = nn.Sequential(nn.Linear(1, 1, bias=False))  # float32
    base[0].weight.data.fill_(0.0)
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["0"], init_lora_weights=False)
    layer = get_peft_model(base, config).base_model.model[0]
    layer.lora_A["default"].to(torch.float16).weight.data.fill_(a)  # as a float16 file loads
    layer.lora_B["default"].to(torch.float16).weight.data.fill_(b)
    exact = a * b  # exact in float32: what a float32 merge gives
    try:
        layer.merge(safe_merge=True)
    except ValueError as error:
        print(f"delta {exact}: refused a merge whose result fits float32: {error}")
        failed = True
        continue
    merged = layer.base_layer.weight.item()
    if merged != exact:
        print(f"delta {exact!r}: the float32 weight got {merged!r} (the delta {what} to float16)")
        failed = True
sys.exit(1 if failed else 0)
