"""PEFT's OSF applies its delta again on every merge(), and its unmerge() restores nothing.

peft/tuners/osf/layer.py, OSFLayer.merge: unlike every other tuner it does not call
check_adapters_to_merge, so a second merge() (merge_adapter twice, or merge after
merge_and_unload's merge) adds the delta a second time; OSFLayer.unmerge only warns
("OSF does not support unmerging") and leaves the merged weight in place while clearing
nothing. Caught by the tuner contract's merge-twice cells (a limitation for unmerge: its
round-trip cells).
"""

import sys
import warnings

import torch
from peft import OSFConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 8))
layer = get_peft_model(model, OSFConfig(target_modules=["0"])).base_model.model[0]
with torch.no_grad():
    for parameter in layer.osf_svd_params["default"].parameters():
        parameter.normal_()
base = layer.get_base_layer()
original = base.weight.detach().clone()
layer.merge(safe_merge=True)
once = base.weight.detach().clone()
layer.merge(safe_merge=True)
twice = base.weight.detach().clone()
layer.unmerge()
print(f"first merge changed the weight by up to {float((once - original).abs().max()):.3g}")
print(f"the second merge changed it again by up to {float((twice - once).abs().max()):.3g}")
print(f"after unmerge, off the original by up to {float((base.weight - original).abs().max()):.3g}")
sys.exit(1 if not torch.equal(once, twice) else 0)
