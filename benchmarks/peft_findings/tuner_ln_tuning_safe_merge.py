"""LN tuning's merge(safe_merge=True) lets a NaN into the merged layer.

LN tuning trains a copy of the target layer and "merges" by swapping the copy in for the
base layer: PEFT's code says safe_merge is irrelevant (no arithmetic, nothing to check).
But safe_merge=True promises a merged layer that holds only finite values, or a
ValueError: a NaN in the trained copy (a diverged step) is swapped in as it is. By design
in PEFT, so a finding about the promise, not about the arithmetic. Caught by the tuner
contract's refusal cells (every dtype, every layer kind). Exits 1 while it happens.
"""

import sys
import warnings

import torch
from peft import LNTuningConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), LNTuningConfig(target_modules=["0"]))
layer = model.base_model.model[0]
with torch.no_grad():
    layer.ln_tuning_layers["default"].bias[4] = float("nan")  # a diverged training step
try:
    layer.merge(safe_merge=True)
except ValueError as error:
    print(f"refused: {error}")
    sys.exit(0)
merged = layer.get_base_layer()
finite = bool(torch.isfinite(merged.weight).all() and torch.isfinite(merged.bias).all())
print(f"merge(safe_merge=True) accepted; merged layer finite: {finite}")
print(f"merged bias: {merged.bias}")
sys.exit(0 if finite else 1)
