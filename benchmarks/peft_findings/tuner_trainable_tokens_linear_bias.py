"""PEFT's trainable tokens on a Linear layer drop its bias until the merge puts it back.

peft/tuners/trainable_tokens/layer.py, TrainableTokensLayer.forward_adapters: on an
nn.Linear (a tied LM head) the unmerged layer computes ``F.linear(x, W)`` with the
replaced rows, leaving the base layer's bias out; the merged layer is the base layer
itself, bias included. So merging changes what the layer computes by the bias (and an
adapter trained on a biased Linear was trained without it). Harmless on the usual LM head
(no bias), wrong on any other Linear PEFT lets it target. Caught by the tuner contract's
accuracy cells (the linear run). Exits 1 while it happens.
"""

import sys
import warnings

import torch
from peft import TrainableTokensConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
config = TrainableTokensConfig(target_modules=["0"], token_indices=[0, 3])
model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), config)
layer = model.base_model.model[0]
x = torch.randn(4, 16)
with torch.no_grad():
    unmerged = layer(x)
    layer.merge(safe_merge=True)
    merged = layer(x)
bias = layer.get_base_layer().bias
difference = (merged - unmerged).abs().max().item()
print(f"merged - unmerged output: max {difference:.3g}; the bias: max {bias.abs().max().item():.3g}")
print(f"the difference is the bias: {torch.allclose(merged - unmerged, bias.expand_as(merged))}")
sys.exit(1 if difference > 0 else 0)
