"""safemerge fuses what PEFT merges: the same definitions, to within both error bounds.

PEFT's float32 merge follows the same arithmetic (B @ A, scaled, added), so the two
results differ by at most twice the bound; DoRA adds PEFT's float32 norm over each output
channel (``gamma(n)`` relative, n its length).
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

from safemerge import LoraAdapter, expected_fuse, fuse
from safemerge.merge.bounds import gamma

peft = pytest.importorskip("peft")
logging.getLogger("peft").setLevel(logging.ERROR)


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer


def _conv1d(in_features: int, out_features: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(out_features, in_features)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


LAYERS = {
    "linear": lambda: nn.Linear(19, 11),
    "embedding": lambda: nn.Embedding(19, 11),
    "conv2d": lambda: nn.Conv2d(5, 11, (3, 2)),
    "conv1d_kernel": lambda: nn.Conv1d(5, 11, 3),
    "gpt2_conv1d": lambda: _conv1d(19, 11),
}


def _peft_layer(kind: str, **config: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = LAYERS[kind]()
    original = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            Holder(base),
            peft.LoraConfig(
                r=4,
                lora_alpha=6,
                target_modules=["proj"],
                init_lora_weights=False,
                fan_in_fan_out=kind == "gpt2_conv1d",
                **config,
            ),
        )
    return original, model.base_model.model.proj


def _adapter_of(lora_layer: nn.Module, kind: str, **flags: bool) -> LoraAdapter:
    if kind == "embedding":
        lora_A, lora_B = (
            lora_layer.lora_embedding_A["default"],
            lora_layer.lora_embedding_B["default"],
        )
        lora_bias = None
    else:
        lora_A, lora_B = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
        lora_bias = lora_layer.lora_B["default"].bias
    magnitude = None
    if flags.get("use_dora"):
        magnitude = lora_layer.lora_magnitude_vector["default"].weight
    return LoraAdapter(
        lora_A.detach().clone(),
        lora_B.detach().clone(),
        alpha=6,
        use_rslora=bool(flags.get("use_rslora")),
        fan_in_fan_out=kind == "gpt2_conv1d",
        lora_bias=None if lora_bias is None else lora_bias.detach().clone(),
        magnitude=None if magnitude is None else magnitude.detach().clone(),
    )


FLAGS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
}
CASES = [
    pytest.param(kind, flags, id=f"{kind}-{name}")
    for kind in sorted(LAYERS)
    for name, flags in FLAGS.items()
    if not (kind == "embedding" and name == "lora_bias")  # PEFT has no lora_bias for embeddings
]


@pytest.mark.parametrize(("kind", "flags"), CASES)
def test_same_merged_weight_as_peft(kind: str, flags: dict[str, bool]) -> None:
    original, lora_layer = _peft_layer(kind, **flags)
    adapter = _adapter_of(lora_layer, kind, **flags)
    reference, bound = expected_fuse(original, [(adapter, 1.0)])

    fuse(original, adapter)
    lora_layer.merge(safe_merge=True)
    merged_by_peft = lora_layer.get_base_layer()

    tolerance = 2 * bound
    if flags.get("use_dora"):
        channel_length = original.weight.numel() // 11
        tolerance = tolerance + gamma(channel_length + 4) * reference.abs()
    difference = (original.weight.detach().double() - merged_by_peft.weight.detach().double()).abs()
    assert bool((difference <= tolerance).all()), float((difference / tolerance).max())
    if flags.get("lora_bias"):
        torch.testing.assert_close(original.bias, merged_by_peft.bias, rtol=4 * 2**-24, atol=0.0)
