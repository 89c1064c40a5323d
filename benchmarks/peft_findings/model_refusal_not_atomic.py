"""PEFT's model-level safe merge is not all-or-nothing: a broken adapter on one layer is
refused after the layers before it were merged (and unloaded).

peft/tuners/tuners_utils.py, BaseTuner._unload_and_optionally_merge: it walks the
model's modules and merges each one with ``safe_merge=True`` in turn, so the NaN in the
second layer's adapter raises with the first layer already merged and replaced by its
base module: the caller gets an exception and a half-merged model. Caught by the model
contract's refusal atomicity cells (every layer kind and dtype).
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model = nn.Sequential()
model.add_module("first", nn.Linear(4, 4))
model.add_module("second", nn.Linear(4, 4))
before = model.first.weight.detach().clone()
config = LoraConfig(target_modules=["first", "second"], r=2, lora_alpha=2, init_lora_weights=False)
peft_model = get_peft_model(model, config)
with torch.no_grad():
    peft_model.base_model.model.second.lora_A["default"].weight[0, 0] = float("nan")
try:
    peft_model.merge_and_unload(safe_merge=True)
except ValueError as error:
    print(f"refused: {error}")
first = peft_model.base_model.model.first
weight = first.get_base_layer().weight if hasattr(first, "get_base_layer") else first.weight
changed = bool((weight != before).any())
print(f"first layer changed by the refused merge: {changed} (now {type(first).__name__})")
sys.exit(1 if changed else 0)
