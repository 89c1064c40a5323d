"""PEFT's add_weighted_adapter scales an rsLoRA adapter's combination by sqrt(r) once too often.

peft/tuners/lora/model.py, LoraModel.add_weighted_adapter: the combined factors already
carry each adapter's scale (``lora_A * weight * scaling``), and the new adapter's config
is ``replace(config, r=new_rank, lora_alpha=new_rank)``, which keeps ``use_rslora``: its
own scaling is then ``new_rank / sqrt(new_rank) = sqrt(new_rank)``, not 1. So
``add_weighted_adapter(["a"], [1.0], "copy")`` of an rsLoRA adapter of rank 4 is the
adapter times 2 (every combination type: one adapter is combined as ``linear``; ``cat``
of several adapters likewise). Caught by the model contract's weighted reproduces and
weighted cat cells (their "rslora" kind of case).
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
model = nn.Sequential()
model.add_module("layer", nn.Linear(6, 5))
config = LoraConfig(
    target_modules=["layer"], r=4, lora_alpha=3, use_rslora=True, init_lora_weights=False
)
peft_model = get_peft_model(model, config, adapter_name="a")
peft_model.add_weighted_adapter(["a"], [1.0], "copy", combination_type="linear")
layer = peft_model.base_model.model.layer
delta = layer.get_delta_weight("a").detach()
copy = layer.get_delta_weight("copy").detach()
ratio = float(copy.norm() / delta.norm())
print(f"combined adapter's delta / the adapter's: {ratio:.4g} (1 expected; sqrt(r) = 2)")
sys.exit(1 if abs(ratio - 1) > 1e-4 else 0)
