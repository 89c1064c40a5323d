"""PEFT's safe merge of several adapters is not all-or-nothing: a broken second adapter is
refused after the first was merged into the weight.

peft/tuners/lora/layer.py, Linear.merge (every LoRA layer class): the loop over
``adapter_names`` checks and commits each adapter in turn, so merge(safe_merge=True,
adapter_names=["a", "b"]) raises for "b" with "a" already in the weight (PEFT records it
in merged_adapters; the caller sees an exception and a half-merged layer, and so does
merge_and_unload). Caught by the suite's module-level atomicity property on its
several-adapter cases.
"""

import sys
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
base = nn.Linear(4, 4, bias=False)
before = base.weight.detach().clone()
config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False)
layer = Linear(base, "a", config=config, r=2, lora_alpha=2)
layer.update_layer("b", 2, 2, config=config)
layer.lora_B["b"].weight.data[0, 0] = float("nan")  # adapter "b" is broken, "a" is fine
try:
    layer.merge(safe_merge=True, adapter_names=["a", "b"])
except ValueError as error:
    print(f"refused: {error}")
changed = bool((base.weight != before).any())
print(f"weight changed by the refused merge: {changed}; merged_adapters: {layer.merged_adapters}")
sys.exit(1 if changed else 0)
