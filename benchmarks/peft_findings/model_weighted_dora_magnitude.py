"""PEFT's add_weighted_adapter drops a DoRA adapter's trained magnitude.

peft/tuners/lora/model.py, LoraModel.add_weighted_adapter: the new adapter is created
with the first adapter's config (``use_dora=True`` kept), which initialises its magnitude
to the norm of the base weight at that moment (``lora_B`` is still zero), and then only
``lora_A`` and ``lora_B`` are combined: the adapter's trained magnitude vector is never
copied. ``add_weighted_adapter(["a"], [1.0], "copy")`` of a trained DoRA adapter is
another adapter (every combination type: one adapter is combined as ``linear``). Caught
by the model contract's weighted reproduces cells (their "dora" kind of case).
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
config = LoraConfig(target_modules=["layer"], r=2, lora_alpha=3, use_dora=True)
peft_model = get_peft_model(model, config, adapter_name="a")
layer = peft_model.base_model.model.layer
with torch.no_grad():  # a trained adapter: B away from zero, the magnitude moved
    layer.lora_B["a"].weight.normal_()
    layer.lora_magnitude_vector["a"].weight.mul_(1.5)
peft_model.add_weighted_adapter(["a"], [1.0], "copy", combination_type="linear")
x = torch.randn(3, 6)
with torch.no_grad():
    peft_model.base_model.set_adapter("a")
    with_a = peft_model(x)
    peft_model.base_model.set_adapter("copy")
    with_copy = peft_model(x)
magnitude = layer.lora_magnitude_vector
ratio = (magnitude["copy"].weight / magnitude["a"].weight).tolist()
gap = float((with_a - with_copy).abs().max())
print(f"combined / trained magnitude: {[round(r, 3) for r in ratio]}; outputs differ by {gap:.3g}")
sys.exit(1 if gap > 1e-4 else 0)
