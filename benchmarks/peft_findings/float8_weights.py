"""PEFT cannot merge into a float8 weight: its merge adds in the weight's dtype, and torch
has no float8 addition (a limitation, not a numerical bug).

peft/tuners/lora/layer.py, Linear.merge: ``orig_weight += delta_weight.to(orig_dtype)``
with orig_weight float8_e4m3fn or float8_e5m2 raises NotImplementedError ("add_stub" not
implemented), safe merge or not, for every adapter. The suite's accuracy property reports
it as a refused finite merge on its float8 cases.
"""

import sys
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear
from torch import nn

warnings.filterwarnings("ignore")
failed = False
for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    base = nn.Linear(4, 4, bias=False)
    base.weight = nn.Parameter(base.weight.detach().to(dtype), requires_grad=False)
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False)
    layer = Linear(base, "default", config=config, r=2, lora_alpha=2)
    layer.lora_A["default"].float()  # PEFT casts the adapter to the base dtype; keep it float32
    layer.lora_B["default"].float()
    try:
        layer.merge(safe_merge=True)
        print(f"{dtype}: merged")
    except NotImplementedError as error:
        print(f"{dtype}: {type(error).__name__}: {error}")
        failed = True
sys.exit(1 if failed else 0)
