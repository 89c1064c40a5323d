"""``safemerge fuse --base-quant``: the merge into ``dequant(quant(W))``, checked against a
float64 oracle on the test's own dequantization (bitsandbytes' quantizer, and its code
table and nested absmax from the quant state; never its CPU ``dequantize_4bit``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safemerge
from safemerge.cli import EXIT_OK, main
from safemerge.merge.bounds import merge_bound

from support.qlora_models import TARGETS, peft_adapter, tiny_llama

pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("base-quant")
    base = tiny_llama(folder / "base")
    return base, peft_adapter(base, folder / "adapter")


def own_dequantization(
    weight: torch.Tensor, quant_type: str, blocksize: int, nested: bool
) -> torch.Tensor:
    """``code[index] * absmax`` per block, in float64, from bitsandbytes' quantizer output."""
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    data = packed.reshape(-1)
    indices = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1).long()[: weight.numel()]
    absmax = state.absmax.double()
    if nested:  # absmax quantized blockwise by 8-bit dynamic codes, plus the offset
        codes = state.state2.code.double()[state.absmax.long()]
        scales = state.state2.absmax.double().repeat_interleave(state.state2.blocksize)
        absmax = codes * scales[: codes.numel()] + float(state.offset)
    values = state.code.double()[indices] * absmax.repeat_interleave(blocksize)[: weight.numel()]
    return values.reshape(weight.shape)


@pytest.mark.parametrize(
    ("quant_type", "blocksize", "nested"),
    [("nf4", 64, False), ("fp4", 128, True), ("nf4", 32, True)],
)
def test_base_quant_equals_an_independent_dequantize_merge(
    quant_type: str, blocksize: int, nested: bool, inputs: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base, adapter = inputs
    output = tmp_path / "merged"
    flags = ["--base-quant", quant_type, "--blocksize", str(blocksize)] + ["--nested"] * nested
    code = main(["fuse", str(base), str(adapter), "-o", str(output), "--json", *flags])
    assert code == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    merged, original = safemerge.open_checkpoint(output), safemerge.open_checkpoint(base)
    adapters = safemerge.load_adapter(adapter, base=original)
    for linear in LINEARS:
        name = f"model.layers.0.{linear}.weight"
        weight = original.read(name)
        # What bitsandbytes computes with: the float32 product, in the weight's dtype.
        trained_against = own_dequantization(weight, quant_type, blocksize, nested).float()
        trained_against = trained_against.to(weight.dtype)
        if not linear.endswith(TARGETS):
            assert torch.equal(merged.read(name), trained_against), name
            continue
        lora = adapters.layers[name]
        reference, bound = merge_bound(
            trained_against, [(lora.lora_B, lora.lora_A, lora.scale)], weight.dtype
        )
        oracle = trained_against.double() + lora.scale * lora.lora_B.double() @ lora.lora_A.double()
        assert torch.allclose(reference, oracle, rtol=0, atol=1e-12)
        error = (merged.read(name).double() - oracle).abs()
        assert (error <= bound).all(), f"{name}: worst {float((error / bound).max()):.3g} of bound"
    # Not quantized by transformers, so written as they are.
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(merged.read(name), original.read(name))
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == {f"model.layers.0.mlp.{t}.weight" if t == "down_proj" else
                           f"model.layers.0.self_attn.{t}.weight" for t in TARGETS}  # fmt: skip
    for layer in layers.values():
        assert layer["written_choice"] == "16bit_dequantized"
        assert layer["output_error"] == layer["output_error_16bit_dequantized"]
        # The faithful merge is off by bfloat16 rounding only; the plain one by W - Wq too.
        assert layer["output_error_16bit_dequantized"] < layer["output_error_16bit"]
        assert 0 <= layer["blocks_unchanged"] <= layer["blocks"]
    assert report["qlora"]["blocks"] == sum(layer["blocks"] for layer in layers.values())


def test_a_small_delta_vanishes_in_requantization_and_the_summary_says_so(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At scale 1e-9 the delta is below float32's resolution of every weight: the
    requantized merge leaves every block exactly as quantized (its absmax included) and
    loses the whole effect (output error 1). (Any larger delta moves a block's absmax,
    so its block counts as changed even where no code moved.)"""
    base, adapter = inputs
    output = tmp_path / "merged"
    flags = ["--base-quant", "nf4", "--scale", "1e-9", "--json"]
    assert main(["fuse", str(base), str(adapter), "-o", str(output), *flags]) == EXIT_OK
    overall = json.loads(capsys.readouterr().out)["qlora"]
    assert overall["blocks_unchanged"] == overall["blocks"] > 0
    assert overall["output_error_quantized"] == pytest.approx(1.0, abs=1e-9)
    assert overall["output_error_16bit"] > 1e4  # W - Wq dwarfs so small an effect
