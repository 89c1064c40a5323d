"""PEFT's BOFT merges NaN into a Conv2d weight under merge(safe_merge=True): no check.

peft/tuners/boft/layer.py, Conv2d.merge: the ``if safe_merge:`` branch computes the
rotated weight and calls set_base_weight without the ``torch.isfinite(...).all()`` check
that BOFT's Linear.merge (and every other tuner's safe merge) makes. A NaN in boft_R
reaches the weight instead of raising ValueError. Caught by the tuner contract's
refusal cells (boft, every dtype).
"""

import sys
import warnings

import torch
from peft import BOFTConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(4, 8, kernel_size=2))
config = BOFTConfig(target_modules=["0"], boft_block_size=2, boft_block_num=0)
layer = get_peft_model(model, config).base_model.model[0]
with torch.no_grad():
    layer.boft_R["default"].normal_()
    layer.boft_R["default"].view(-1)[3] = float("nan")
try:
    layer.merge(safe_merge=True)
except ValueError as error:
    print(f"refused, as a safe merge should: {error}")
    sys.exit(0)
weight = layer.get_base_layer().weight
print(
    f"merge(safe_merge=True) did not refuse a NaN in boft_R: {int(weight.isnan().sum())} of "
    f"{weight.numel()} merged Conv2d weights are NaN"
)
sys.exit(1)
