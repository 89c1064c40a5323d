"""PEFT's add_weighted_adapter drops the adapters' lora_bias.

peft/tuners/lora/model.py, LoraModel.add_weighted_adapter: the new adapter is created
with the first adapter's config (``lora_bias=True`` kept, so ``lora_B`` has a bias), but
only ``lora_A`` and ``lora_B``'s weights are combined: the bias keeps its initial value
(zero by default; random here, with ``init_lora_weights=False``), never the adapters'.
``add_weighted_adapter(["a"], [1.0], "copy")`` then has ``a``'s weight delta but not its
bias delta ``s b_lora`` (every combination
type; ``cat`` of several adapters likewise). Caught by the model contract's weighted
reproduces and weighted cat cells (their "lora_bias" kind of case).
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
    target_modules=["layer"], r=2, lora_alpha=3, lora_bias=True, init_lora_weights=False
)
peft_model = get_peft_model(model, config, adapter_name="a")
layer = peft_model.base_model.model.layer
with torch.no_grad():
    layer.lora_B["a"].bias.normal_()
peft_model.add_weighted_adapter(["a"], [1.0], "copy", combination_type="linear")
x = torch.randn(3, 6)
with torch.no_grad():
    peft_model.base_model.set_adapter("a")
    with_a = peft_model(x)
    peft_model.base_model.set_adapter("copy")
    with_copy = peft_model(x)
held = layer.lora_B["copy"].bias.detach()
gap = float((with_a - with_copy).abs().max())
print(f"the combined adapter's lora bias: {held.tolist()}; outputs differ by {gap:.3g}")
sys.exit(1 if gap > 1e-4 else 0)
