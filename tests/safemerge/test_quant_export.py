"""``safemerge fuse --quant``: a bitsandbytes checkpoint transformers loads quantized.

Every packed byte must be what ``safemerge.fuse`` gives on the same layer quantized in
memory by transformers itself, and the weights must stay within the quantization
bounds of the 16-bit merge ``W + delta``: the requantized merge is within its block
bound ``b_q`` of ``dequant(quant(W)) + delta``, which is within the bound ``b_w`` of
quantizing ``W`` of ``W + delta``; so ``|W_q' - (W + delta)| <= b_q + b_w`` per element
and, for any input, ``|x W_q'^T - x (W + delta)^T| <= |x| (b_q + b_w)^T``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import safemerge
from safemerge.cli import EXIT_CHECK_FAILED, EXIT_OK, main
from safemerge.io import writer
from safemerge.quant.quantized import quantization_bound

from support.qlora_models import TARGETS, peft_adapter, scaled, tiny_llama

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

SETTINGS = {
    "nf4-nested": (["--quant", "nf4", "--nested"], {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}),
    "fp4": (["--quant", "fp4"], {"bnb_4bit_quant_type": "fp4"}),
    "int8": (["--quant", "int8"], {}),
}  # fmt: skip
LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("qlora")
    base = tiny_llama(folder / "base")
    return base, peft_adapter(base, folder / "adapter")


def bnb_config(setting: str) -> object:
    _, fields = SETTINGS[setting]
    if setting == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **fields
    )


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_quant_output_loads_quantized_and_equals_the_in_memory_fuse(
    setting: str, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    import bitsandbytes as bnb

    base, adapter = inputs
    output = tmp_path / "merged"
    flags, _ = SETTINGS[setting]
    assert main(["fuse", str(base), str(adapter), "-o", str(output), "-q", *flags]) == EXIT_OK
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"] == bnb_config(setting).to_dict()  # type: ignore[attr-defined]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(output)
    expected_class = bnb.nn.Linear8bitLt if setting == "int8" else bnb.nn.Linear4bit
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, expected_class)}
    assert quantized == {
        f"model.layers.0.{part}"
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }  # fmt: skip
    assert type(loaded.lm_head) is torch.nn.Linear

    # The same layer quantized in memory by transformers, fused by safemerge.fuse.
    in_memory = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=bnb_config(setting), device_map="cpu"
    )
    adapters = safemerge.load_adapter(adapter, base=safemerge.open_checkpoint(base))
    for target in TARGETS:
        name = next(n for n in quantized if n.endswith(target))
        layer = in_memory.get_submodule(name)
        base_values, base_bound = quantization_bound(
            layer, safemerge.open_checkpoint(base).read(f"{name}.weight").float()
        )
        safemerge.fuse(layer, adapters.layers[f"{name}.weight"], scale=1.0, name=name)
        exported = loaded.get_submodule(name)
        assert torch.equal(
            exported.weight.data.view(torch.uint8), layer.weight.data.view(torch.uint8)
        )
        if setting == "int8":
            assert torch.equal(exported.weight.SCB, layer.weight.SCB)
        else:
            exported_state, state = exported.weight.quant_state, layer.weight.quant_state
            assert torch.equal(exported_state.absmax, state.absmax)
            assert exported_state.blocksize == state.blocksize == 64
            if state.nested:
                assert torch.equal(exported_state.state2.absmax, state.state2.absmax)
                assert float(exported_state.offset) == float(state.offset)

        # Within the quantization bounds of the 16-bit merge W + delta (module docstring).
        lora = adapters.layers[f"{name}.weight"]
        weight = safemerge.open_checkpoint(base).read(f"{name}.weight").double()
        delta = lora.scale * lora.lora_B.double() @ lora.lora_A.double()
        ideal = base_values.double() + delta
        values, merge_bound = quantization_bound(exported, ideal.float())
        total_bound = merge_bound + base_bound + 1e-6 * ideal.abs()  # float32 delta rounding
        assert ((values.double() - (weight + delta)).abs() <= total_bound).all()
        x = torch.randn(
            8, weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
        forward_error = (x @ values.double().T - x @ (weight + delta).T).abs()
        assert (forward_error <= x.abs() @ total_bound.T).all()


@pytest.mark.parametrize(
    ("flags", "broken"),
    [
        (["--quant", "nf4"], "nan"),
        (["--quant", "int8"], "float16-overflow"),  # int8 quantizes through float16
        (["--quant", "fp4", "--nested"], "nan"),
        (["--base-quant", "nf4", "--dtype", "float16"], "float16-overflow"),
        (["--base-quant", "fp4"], "nan"),
    ],
)
def test_broken_adapters_are_refused_and_nothing_is_written(
    flags: list[str], broken: str, inputs: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base, adapter = inputs
    factor = {"nan": 1.0, "float16-overflow": 3e5}[broken]
    bad = scaled(adapter, tmp_path / "bad", factor, nan=broken == "nan")
    output = tmp_path / "out" / "merged"
    before = sorted(path.name for path in tmp_path.rglob("*"))
    code = main(["fuse", str(base), str(bad), "-o", str(output), "-q", *flags])
    assert code == EXIT_CHECK_FAILED
    message = capsys.readouterr().err
    assert "NaN" in message or "overflow" in message or "Inf" in message
    assert not output.exists() and not writer.leftover_temporaries(output)
    assert (
        sorted(path.name for path in tmp_path.rglob("*")) == [*before, "out"]
        or sorted(path.name for path in tmp_path.rglob("*")) == before
    )  # nothing but (at most) the empty parent


def test_the_planned_layout_is_what_transformers_saves(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Names, dtypes and shapes as ``save_pretrained`` writes them for a model transformers
    quantized (the quant-state JSON padded: same content, maybe longer)."""
    base, adapter = inputs
    for setting in SETTINGS:
        saved = tmp_path / f"saved-{setting}"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            base, quantization_config=bnb_config(setting), device_map="cpu"
        )
        model.save_pretrained(saved)
        output = tmp_path / f"ours-{setting}"
        assert (
            main(["fuse", str(base), str(adapter), "-o", str(output), "-q", *SETTINGS[setting][0]])
            == 0
        )
        theirs, ours = safemerge.open_checkpoint(saved), safemerge.open_checkpoint(output)
        assert set(theirs.names) == set(ours.names)
        for name in theirs.names:
            if "quant_state" in name:
                # The nested offset is the mean absmax: an adapted layer's differs.
                ours_state = json.loads(bytes(ours.read(name).tolist()).decode())
                theirs_state = json.loads(bytes(theirs.read(name).tolist()).decode())
                ours_state.pop("nested_offset", None), theirs_state.pop("nested_offset", None)
                assert ours_state == theirs_state
                continue
            assert (ours.info(name).dtype, ours.info(name).shape) == (
                theirs.info(name).dtype,
                theirs.info(name).shape,
            ), name
