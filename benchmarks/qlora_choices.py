"""Which to ship for a QLoRA adapter: the three merges of one adapter, measured.

A tiny Llama built from a config (no download), a rank-8 LoRA on every projection whose
``lora_B`` is small, as after a short QLoRA run (``B ~ N(0, sigma)``). Exports:

1. ``safemerge fuse`` (16-bit merge into W),
2. ``--base-quant nf4 --nested`` (16-bit merge into dequant(quant(W))),
3. ``--quant nf4 --nested`` (guarded requantized merge into the nf4 base),

and prints, per choice, the adapter effect kept (``1 - ||y - y_ref|| / ||delta x||``
against the output the adapter was trained for), blocks unchanged, and file size.

    .venv/bin/python benchmarks/qlora_choices.py [--hidden 256] [--sigma 0.01]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from safemerge.io.bnb_checkpoint import QuantSpec
from safemerge.model.quantized_export import export_files, qlora_overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.01, help="std of lora_B")
    arguments = parser.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="qlora-choices-"))
    config = LlamaConfig(
        vocab_size=256, hidden_size=arguments.hidden, intermediate_size=2 * arguments.hidden,
        num_hidden_layers=arguments.layers, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "base")
    model = LlamaForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, arguments.sigma)
    peft_model.save_pretrained(folder / "adapter")
    spec = QuantSpec("nf4", 64, nested=True)
    runs = {
        "16-bit merge into W": {},
        "16-bit merge into dequant(quant(W))": {"base_quant": spec},
        "nf4 requantized merge": {"quant": spec},
    }
    sizes = {}
    comparison = None
    for label, options in runs.items():
        report = export_files(
            folder / "base", [folder / "adapter"], folder / label.replace(" ", "_"), **options
        )  # type: ignore[arg-type]
        sizes[label] = sum(path.stat().st_size for path in report.output.glob("*.safetensors"))  # type: ignore[union-attr]
        if "base_quant" in options:
            comparison = qlora_overall(report)
    assert comparison is not None
    keys = {
        "16-bit merge into W": "output_error_16bit",
        "16-bit merge into dequant(quant(W))": "output_error_16bit_dequantized",
        "nf4 requantized merge": "output_error_quantized",
    }
    print(
        f"tiny Llama hidden {arguments.hidden}, {arguments.layers} layers, rank-8 LoRA on every projection, lora_B ~ N(0, {arguments.sigma})"
    )
    print("| choice | adapter effect kept | blocks unchanged | weights file |")
    print("|---|---|---|---|")
    for label, key in keys.items():
        kept = 1 - float(comparison[key])
        blocks = (
            f"{comparison['blocks_unchanged']:,} of {comparison['blocks']:,}"
            if "nf4" in label
            else "-"
        )
        print(f"| {label} | {kept:.1%} | {blocks} | {sizes[label] / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
