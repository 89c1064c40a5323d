"""safemerge.diffusers on LoRAs loaded by diffusers' own ``load_lora_weights`` from the
three file formats users have: PEFT (``unet.<module>.lora_A.weight``), kohya
(``lora_unet_*`` / ``lora_te_*`` with ``.alpha``) and old diffusers (``lora.down`` /
``lora_linear_layer.down``), written here with safetensors.

The same factors go into each file. kohya carries ``alpha = 2 * rank`` (scaling 2); the
two formats without an alpha (scaling 1) carry ``2 * B`` instead. Doubling is exact in
binary floating point and diffusers' conversions only rename keys, so each layer's
coefficient times its factors is the same float32 product in every format, and the fused
weights must be bit for bit the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

import safemerge.diffusers
from pytest_safemerge import pipelines as tiny_pipelines

pytestmark = pytest.mark.filterwarnings("ignore")

RANK = 4
#: kohya's alpha: scaling alpha / rank = 2, a power of two (see the module docstring).
ALPHA = 2.0 * RANK
#: kohya text-encoder LoRAs cover every attention projection (diffusers infers the old
#: text-encoder format from the ``out_proj`` keys).
TEXT_TARGETS = tiny_pipelines.TEXT_ENCODER_TARGETS


def _factors(pipe: Any) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Seeded ``(A, B)`` per targeted module: ``(component, module name)``."""
    generator = torch.Generator().manual_seed(11)
    targets = [
        ("unet", name, module)
        for name, module in pipe.unet.named_modules()
        if name.endswith(tiny_pipelines.UNET_TARGETS)
    ]
    targets += [
        ("text_encoder", name, module)
        for name, module in pipe.text_encoder.named_modules()
        if name.endswith(TEXT_TARGETS)
    ]
    return {
        (component, name): (
            torch.randn(RANK, module.in_features, generator=generator),
            torch.randn(module.out_features, RANK, generator=generator) * 0.5,
        )
        for component, name, module in targets
    }


def _peft_file(factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    return {
        f"{component}.{name}.lora_{part}.weight": tensor
        for (component, name), (down, up) in factors.items()
        for part, tensor in (("A", down), ("B", 2 * up))
    }


def _kohya_file(factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    state = {}
    for (component, name), (down, up) in factors.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        key = prefix + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state


def _old_diffusers_file(factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    state = {}
    for (component, name), (down, up) in factors.items():
        if component == "unet":
            key, layer = f"unet.{name}", "lora"
        else:
            key, layer = f"text_encoder.text_model.{name}", "lora_linear_layer"
        state[f"{key}.{layer}.down.weight"] = down
        state[f"{key}.{layer}.up.weight"] = 2 * up
    return state


FORMATS = {"peft": _peft_file, "kohya": _kohya_file, "old-diffusers": _old_diffusers_file}


def _fused_weights(file_format: str, dtype: torch.dtype, directory: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_pipelines.sd_pipeline(dtype)
        path = directory / f"{file_format}.safetensors"
        save_file(FORMATS[file_format](_factors(pipe)), str(path))
        pipe.load_lora_weights(str(directory), weight_name=path.name, adapter_name="style")
    safemerge.diffusers.fuse_lora(pipe, lora_scale=0.7)
    weights = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, BaseTunerLayer):
                assert module.merged_adapters == ["style"]
                weights[f"{component}.{name}"] = module.get_base_layer().weight.clone()
    return weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_three_file_formats_fuse_to_the_same_bits(dtype: torch.dtype, tmp_path: Path) -> None:
    fused = {fmt: _fused_weights(fmt, dtype, tmp_path) for fmt in FORMATS}
    peft = fused["peft"]
    expected = len(_factors(tiny_pipelines.sd_pipeline()))
    assert len(peft) == expected  # every targeted module, UNet and text encoder
    for file_format, weights in fused.items():
        assert weights.keys() == peft.keys(), file_format
        for name, weight in weights.items():
            assert torch.equal(weight, peft[name]), f"{file_format}: {name}"
