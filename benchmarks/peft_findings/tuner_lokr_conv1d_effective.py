"""PEFT's LoKr on a Conv1d with use_effective_conv2d crashes: forward, merge, everything.

peft/tuners/lokr/layer.py: a Conv1d layer whose rank is small enough for the CP
decomposition (``lokr_t2`` of shape ``(r, r, k, 1)``) builds ``w2`` with
``make_weight_cp``, an einsum whose result has a trailing size-1 dimension with a
non-unit stride (here ``(8, 2, 1, 32)``). ``make_kron`` calls ``w2.contiguous()``, which
is a no-op (a size-1 dimension's stride does not count), and ``torch.kron`` then fails in
an internal ``view``: "view size is not compatible with input tensor's size and stride".
Every dtype; the layer cannot be used or merged at all (``w2.clone(memory_format=
torch.contiguous_format)`` or ``reshape`` to a fresh layout would fix it). The plain torch
part is shown at the end. Caught by the tuner contract's LoKr cells (the conv1d run with
use_effective_conv2d on). Exits 1 while it happens.
"""

import sys
import warnings

import torch
from peft import LoKrConfig, get_peft_model
from torch import nn

warnings.filterwarnings("ignore")
torch.manual_seed(0)
config = LoKrConfig(target_modules=["0"], r=1, use_effective_conv2d=True)
model = get_peft_model(nn.Sequential(nn.Conv1d(8, 8, kernel_size=2)), config)
layer = model.base_model.model[0]
print({name: tuple(p.shape) for name, p in layer.named_parameters()})
crashed = []
for what, call in (
    ("forward", lambda: layer(torch.randn(1, 8, 5))),
    ("merge(safe_merge=True)", lambda: layer.merge(safe_merge=True)),
):
    try:
        call()
        print(f"{what}: ok")
    except RuntimeError as error:
        print(f"{what}: RuntimeError: {error}")
        crashed.append(what)

# The torch part: kron of a tensor whose size-1 dimension has an unusual stride.
w2 = torch.einsum("ijkl,ip,jr->prkl", torch.randn(1, 1, 2, 1), torch.randn(1, 4), torch.randn(1, 4))
print(f"einsum result strides {w2.stride()}, is_contiguous() = {w2.is_contiguous()}")
for name, tensor in (
    ("as is", w2),
    ("re-laid out", w2.clone(memory_format=torch.contiguous_format)),
):
    try:
        torch.kron(torch.randn(2, 2, 1, 1), tensor)
        print(f"torch.kron with w2 {name}: ok")
    except RuntimeError as error:
        print(f"torch.kron with w2 {name}: {error}")
sys.exit(1 if crashed else 0)
