"""PEFT's Conv3d merge takes the Conv2d 1x1 shortcut when the kernel starts with 1 x 1.

peft/tuners/lora/layer.py, _ConvNd.get_delta_weight: ``if weight.size()[2:4] == (1, 1)``
is also true for a Conv3d kernel (1, 1, k); the shortcut squeezes dims 3 and 2 of 5-D
tensors and multiplies the wrong matrices. A plain LoRA merge then fails with a shape
error (a finite merge refused); a DoRA merge broadcasts instead and silently replaces the
(1, 1, 1, 1, 1) weight by a (2, 2, 1, 1, 1) one. Caught by the suite's module-level
accuracy and form properties on conv3d cases. (Reported upstream as huggingface/peft#3768.)
"""

import sys
import warnings

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Conv3d
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
broken = False
for use_dora in (False, True):
    base = nn.Conv3d(1, 1, kernel_size=1, bias=False)
    config = LoraConfig(r=2, lora_alpha=2, use_dora=use_dora, init_lora_weights=False)
    layer = Conv3d(base, "default", config=config, r=2, lora_alpha=2)
    try:
        layer.merge(safe_merge=True)
    except RuntimeError as error:
        print(f"use_dora={use_dora}: merge failed: {error}")
        broken = True
        continue
    shape = tuple(base.weight.shape)
    print(f"use_dora={use_dora}: merged; the (1, 1, 1, 1, 1) weight is now {shape}")
    broken |= shape != (1, 1, 1, 1, 1)
sys.exit(1 if broken else 0)
