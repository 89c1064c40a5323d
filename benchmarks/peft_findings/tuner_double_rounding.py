"""Several PEFT tuners round their delta to a bfloat16 weight's dtype before the add.

The merged weight should be the exact map of the unmerged layer (base weight plus the
float32 adapter's delta) rounded once to bfloat16; in C3A, DEFT, DeLoRA, FRoD, GLoRA,
HiRA, PEANuT, PSOFT, RoAd and SuperTuning it is not (LoHa, computed in float32 and added once, is for
comparison). Like LoRA's double rounding (double_rounding.py): two roundings, so entries
are off by more than half an ulp of the result. Caught by the tuner contract's accuracy
cells (bfloat16, float16).
"""

import sys
import warnings

import torch
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

warnings.filterwarnings("ignore")
TUNERS = {
    "C3A": {"block_size": 4},
    "DEFT": {"r": 1},
    "DELORA": {"r": 1},
    "FROD": {},
    "GLORA": {"r": 2},
    "HIRA": {"r": 2},
    "PEANUT": {"r": 2},
    "PSOFT": {"r": 2},
    "ROAD": {"group_size": 4},  # its default (64) is wider than the 16-input layer
    "SUPERTUNING": {"r": 2},
    "LOHA": {"r": 2},  # rounds once: the control
}


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """What the layer computes, read in float64 on the standard basis."""
    import copy

    probe = copy.deepcopy(layer).double().eval()
    with torch.no_grad():
        return (
            probe(torch.eye(16, dtype=torch.float64))
            - probe(torch.zeros(1, 16, dtype=torch.float64))
        ).T


buggy = []
for name, options in TUNERS.items():
    if name not in PEFT_TYPE_TO_CONFIG_MAPPING:
        continue
    torch.manual_seed(0)
    config = PEFT_TYPE_TO_CONFIG_MAPPING[name](target_modules=["0"], **options)
    model = nn.Sequential(nn.Linear(16, 8).to(torch.bfloat16))
    layer = next(
        m for m in get_peft_model(model, config).modules() if hasattr(m, "merged_adapters")
    )
    with torch.no_grad():
        for key, parameter in layer.named_parameters():
            if not key.startswith("base_layer."):
                parameter.normal_()
    exact = effective_weight(layer)
    layer.eval().merge(safe_merge=True)
    merged = layer.get_base_layer().weight.double()
    wrong = int((merged != exact.to(torch.bfloat16).double()).sum())
    print(
        f"{name:12} {wrong:3} of {merged.numel()} merged bfloat16 weights are not the exact map rounded once"
    )
    if wrong and name != "LOHA":
        buggy.append(name)
sys.exit(1 if buggy else 0)
