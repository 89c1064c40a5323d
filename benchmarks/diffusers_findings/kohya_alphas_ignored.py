"""diffusers' load_lora_weights gives every layer of a kohya LoRA the most common alpha: a
layer whose own ``.alpha`` differs acts at the wrong strength.

kohya files carry one ``.alpha`` per layer. diffusers 0.42 converts the keys to its own
names, then builds the ``alpha_pattern`` from the per-layer alphas under the converted
names (``...attn1.processor.to_q_lora.down.weight``), which match no module: PEFT applies
the config's ``lora_alpha`` (the most common alpha) everywhere. Found while checking
``safemerge fuse`` of a pipeline directory against diffusers' own load + fuse
(tests/safemerge/test_cli_pipeline.py); safemerge applies each layer's own alpha.
Related: huggingface/diffusers#14409 (mixed ranks without alpha keys).
"""

import sys

import torch
from _tiny_sd import tiny_pipelines
from torch import nn

RANK = 2
pipe = tiny_pipelines.sd_pipeline(torch.float32)
generator = torch.Generator().manual_seed(0)
state: dict[str, torch.Tensor] = {}
expected: dict[str, float] = {}
modules = [
    (name, module)
    for name, module in pipe.unet.named_modules()
    if isinstance(module, nn.Linear) and name.endswith(tiny_pipelines.UNET_TARGETS)
]
for index, (name, module) in enumerate(modules):
    # Alpha 1 on every third layer, 2 on the others: 2 is the most common.
    alpha = 1.0 if index % 3 == 0 else 2.0
    stem = "lora_unet_" + name.replace(".", "_")
    state[f"{stem}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=generator)
    state[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=generator)
    state[f"{stem}.alpha"] = torch.tensor(alpha)
    expected[name] = alpha / RANK
pipe.load_lora_weights(state, adapter_name="kohya")
wrong = []
for name, module in pipe.unet.named_modules():
    if name in expected and hasattr(module, "scaling"):
        scaling = module.scaling["kohya"]
        if abs(scaling - expected[name]) > 1e-12:
            wrong.append((name, expected[name], scaling))
print(f"{len(wrong)} of {len(expected)} kohya layers have the wrong LoRA scale after load_lora_weights")
for name, want, got in wrong[:3]:
    print(f"  {name}: alpha/r = {want}, diffusers' scaling = {got}")
sys.exit(1 if wrong else 0)
