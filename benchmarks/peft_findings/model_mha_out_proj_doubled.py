"""PEFT's LoRA on nn.MultiheadAttention adds the out_proj delta twice, in merge and in the
forward alike.

peft/tuners/lora/layer.py, MultiheadAttention.merge: it writes ``out_proj.weight +
delta`` into out_proj's base layer, then calls ``base_layer.out_proj.merge(...)``, the
LoRA Linear wrapping out_proj, which adds the same delta again. The unmerged forward
merges temporarily through the same code, so PEFT's merged and unmerged forwards agree,
and both are wrong: out_proj holds ``W + 2 s B A``. Caught by the model contract's
weight oracle (merge accuracy, multihead_attention cells); a forward comparison alone
cannot see it.
"""

import sys
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x)[0]


model = Model()
original = model.mha.out_proj.weight.detach().clone()
peft_model = get_peft_model(
    model, LoraConfig(target_modules=["mha"], r=2, lora_alpha=2, init_lora_weights=False)
)
out_proj = peft_model.base_model.model.mha.base_layer.out_proj
delta = out_proj.get_delta_weight("default").detach().clone()
peft_model.merge_adapter()
merged = out_proj.get_base_layer().weight.detach()
once = float((merged - (original + delta)).abs().max())
twice = float((merged - (original + 2 * delta)).abs().max())
print(f"out_proj after merge_adapter: off W + delta by {once:.3g}, off W + 2 delta by {twice:.3g}")
sys.exit(1 if once > 1e-5 and twice < 1e-5 else 0)
