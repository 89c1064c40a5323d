"""``safemerge fuse`` with a diffusers pipeline directory as the base.

Tiny SD and SDXL pipelines are saved with ``save_pretrained``; one set of LoRA factors
(A, B, alpha per layer) is written in kohya, old diffusers and PEFT (diffusers) form, so
every format must give the same merged weights, each element within its bound of a
float64 oracle, and the output must load and run in diffusers.

The bound of one fused element (``W`` in the weight's dtype, cast exactly to float32):
the coefficient ``c = alpha / r`` rounded to float32, folded into ``B`` (one rounding),
``r`` products and ``r - 1`` sums, and the add of ``W``: at most ``r + 3`` float32
roundings, so ``|fl32 - exact| <= gamma_(r+3) * (|W| + |c| |B| @ |A|)`` (``gamma_n = n u /
(1 - n u)``, ``u = 2**-24``); then one cast to the weight's dtype adds half an ulp of the
result, ``u_d * (|exact| + acc)`` (``u_d`` = 2**-8 for bfloat16, 2**-24 for float32), or
half the dtype's smallest subnormal below its normal range.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pytest_safemerge import pipelines as tiny_pipelines
from safemerge.cli import EXIT_CHECK_FAILED, EXIT_INPUT, EXIT_OK, main
from safemerge.io.writer import leftover_temporaries

pytest.importorskip("diffusers")

#: Modules each component's LoRA adapts (unet: every attention projection, and one 1x1
#: convolution; text encoders: the attention projections and an MLP layer).
_UNET_SUFFIXES = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v")
_UNET_CONV = "down_blocks.0.attentions.0.proj_in"
_TEXT_MODULES = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.1.self_attn.out_proj",
    "encoder.layers.0.mlp.fc1",
)
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}
_HALF_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134}

#: A LoRA's factors: component -> base module -> (A, B, alpha).
Factors = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]


def _lora_name(component: str, module: str) -> str:
    """How LoRA files name a module: a text encoder's as transformers' CLIP layout does
    (``text_model.encoder...``), which transformers 5 saves unwrapped (``encoder...``)."""
    if component.startswith("text_encoder") and not module.startswith("text_"):
        return f"text_model.{module}"
    return module


# -- pipelines and LoRA files ---------------------------------------------------------------


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def sd_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sd") / "pipe"
    tiny_pipelines.sd_pipeline(request.param).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sdxl") / "pipe"
    tiny_pipelines.sdxl_pipeline(torch.bfloat16).save_pretrained(directory)
    return directory


def _weights(pipe_dir: Path, component: str) -> dict[str, torch.Tensor]:
    (file,) = sorted((pipe_dir / component).glob("*.safetensors"))
    with safe_open(str(file), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def _factors(
    pipe_dir: Path, seed: int = 0, alphas: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
) -> Factors:
    """A, B (float32) and alpha for every targeted module, ranks 2 and 3, ``alphas`` in turn."""
    generator = torch.Generator().manual_seed(seed)
    targets: dict[str, list[str]] = {}
    unet = _weights(pipe_dir, "unet")
    targets["unet"] = [
        name.removesuffix(".weight")
        for name in unet
        if name.endswith(tuple(f"{suffix}.weight" for suffix in _UNET_SUFFIXES))
    ] + [_UNET_CONV]
    for component in ("text_encoder", "text_encoder_2"):
        if (pipe_dir / component).is_dir():
            targets[component] = list(_TEXT_MODULES)
    factors: Factors = {}
    for component, modules in targets.items():
        weights = _weights(pipe_dir, component)
        factors[component] = {}
        for position, wanted in enumerate(modules):
            module = wanted if f"{wanted}.weight" in weights else f"text_model.{wanted}"
            shape = weights[f"{module}.weight"].shape
            rank = 2 + position % 2
            kernel = tuple(shape[2:])
            lora_A = torch.randn(rank, shape[1], *kernel, generator=generator) * 0.5
            lora_B = torch.randn(shape[0], rank, *(1 for _ in kernel), generator=generator) * 0.5
            factors[component][module] = (lora_A, lora_B, alphas[position % len(alphas)])
    return factors


def _kohya_file(path: Path, factors: Factors) -> Path:
    text_prefix = {"text_encoder": "te1", "text_encoder_2": "te2"}
    if "text_encoder_2" not in factors:
        text_prefix["text_encoder"] = "te"  # SD 1.x files say lora_te_
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in factors.items():
        prefix = "unet" if component == "unet" else text_prefix[component]
        for module, (lora_A, lora_B, alpha) in modules.items():
            stem = f"lora_{prefix}_{_lora_name(component, module).replace('.', '_')}"
            tensors[f"{stem}.lora_down.weight"] = lora_A
            tensors[f"{stem}.lora_up.weight"] = lora_B
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _old_diffusers_file(path: Path, factors: Factors) -> Path:
    """Attention projections in processor form (``attn1.processor.to_q_lora``, CLIP's
    ``self_attn.to_q_lora``), the rest as ``lora.down`` / ``lora_linear_layer.down``."""
    processors = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in factors.items():
        for base_module, (lora_A, lora_B, alpha) in modules.items():
            module = _lora_name(component, base_module)
            parent, _, leaf = module.removesuffix(".0").rpartition(".")
            if component == "unet" and leaf.startswith("to_"):
                stem, sep = f"{component}.{parent}.processor.{leaf}", "_lora"
            elif leaf in processors:
                stem, sep = f"{component}.{parent}.{processors[leaf]}", "_lora"
            elif component == "unet":
                stem, sep = f"{component}.{module}", ".lora"
            else:
                stem, sep = f"{component}.{module}", ".lora_linear_layer"
            tensors[f"{stem}{sep}.down.weight"] = lora_A
            tensors[f"{stem}{sep}.up.weight"] = lora_B
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _peft_file(path: Path, factors: Factors) -> Path:
    """diffusers' own format: component-prefixed lora_A/lora_B, the config per component in
    the ``lora_adapter_metadata`` metadata, ranks and alphas as patterns."""
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for component, modules in factors.items():
        for base_module, (lora_A, lora_B, _) in modules.items():
            module = _lora_name(component, base_module)
            tensors[f"{component}.{module}.lora_A.weight"] = lora_A
            tensors[f"{component}.{module}.lora_B.weight"] = lora_B
        config[f"{component}.r"] = 2
        config[f"{component}.lora_alpha"] = 1.0
        config[f"{component}.rank_pattern"] = {
            re.escape(_lora_name(component, module)): int(lora_A.shape[0])
            for module, (lora_A, _, _) in modules.items()
        }
        config[f"{component}.alpha_pattern"] = {
            re.escape(_lora_name(component, module)): alpha
            for module, (_, _, alpha) in modules.items()
        }
        config[f"{component}.target_modules"] = sorted(
            _lora_name(component, module) for module in modules
        )
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    return path


_WRITERS = {"kohya": _kohya_file, "diffusers": _old_diffusers_file, "peft": _peft_file}


# -- the oracle -----------------------------------------------------------------------------


def _oracle(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exact, float32 accumulation bound, bound of the merged weight, |c| |B| @ |A|)``,
    in float64."""
    rank = lora_A.shape[0]
    coefficient = alpha / rank
    A, B = lora_A.double().flatten(1), lora_B.double().flatten(1)
    W = weight.double()
    exact = W + (coefficient * (B @ A)).reshape(W.shape)
    product = (abs(coefficient) * (B.abs() @ A.abs())).reshape(W.shape)
    magnitude = W.abs() + product
    n, u = rank + 3, 2.0**-24
    accumulation = n * u / (1 - n * u) * magnitude
    u_d = _UNIT_ROUNDOFF[weight.dtype]
    bound = (
        accumulation + u_d * (exact.abs() + accumulation) + _HALF_SMALLEST_SUBNORMAL[weight.dtype]
    )
    return exact, accumulation, bound, product


def _assert_fused_as_oracle(base: Path, output: Path, factors: Factors) -> None:
    for component, modules in factors.items():
        before, after = _weights(base, component), _weights(output, component)
        assert after.keys() == before.keys()
        for name, tensor in before.items():
            module = name.removesuffix(".weight")
            if module not in modules or not name.endswith(".weight"):
                assert torch.equal(after[name], tensor), f"{component}.{name} changed"
                continue
            fused = after[name]
            assert fused.dtype == tensor.dtype and fused.shape == tensor.shape
            exact, _, bound, _ = _oracle(tensor, *modules[module])
            error = (fused.double() - exact).abs()
            worst = float((error / bound).max())
            assert worst <= 1.0, f"{component}.{name}: {worst:.3g} of its bound"
            # The check has teeth: the LoRA moves every layer by more than its bound.
            assert bool(((exact - tensor.double()).abs() > bound).any()), name


def _fuse(base: Path, lora: Path, output: Path, *extra: str) -> int:
    return main(["fuse", str(base), str(lora), "-o", str(output), "--quiet", *extra])


def _files(folder: Path) -> Iterator[Path]:
    return (path for path in sorted(folder.rglob("*")) if path.is_file())


# -- tests ----------------------------------------------------------------------------------


def test_every_format_fuses_into_the_pipeline_as_the_oracle_and_loads(
    sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import DiffusionPipeline

    factors = _factors(sd_dir)
    outputs = {}
    for name, write in _WRITERS.items():
        lora = write(tmp_path / f"{name}.safetensors", factors)
        outputs[name] = tmp_path / f"out-{name}"
        assert _fuse(sd_dir, lora, outputs[name], "--json") == EXIT_OK
        summary = json.loads(capsys.readouterr().out)
        fused = {layer["name"] for layer in summary["layers"]}
        expected = {f"{c}.{m}.weight" for c, modules in factors.items() for m in modules}
        assert fused == expected
        assert all(layer["worst_error_of_bound"] <= 1.0 for layer in summary["layers"])
        _assert_fused_as_oracle(sd_dir, outputs[name], factors)
    # Same factors, same merged bits, whatever the format.
    for component in factors:
        reference = _weights(outputs["kohya"], component)
        for name in ("diffusers", "peft"):
            other = _weights(outputs[name], component)
            assert all(torch.equal(other[key], reference[key]) for key in reference), name
    # Everything else is the base's, byte for byte: the vae, configs, tokenizer, scheduler.
    output = outputs["peft"]
    base_files = {path.relative_to(sd_dir) for path in _files(sd_dir)}
    assert {path.relative_to(output) for path in _files(output)} == base_files
    for relative in base_files:
        if relative.parts[0] not in factors or relative.suffix != ".safetensors":
            assert (output / relative).read_bytes() == (sd_dir / relative).read_bytes(), relative
    # It loads in diffusers, with the fused weights, and denoises.
    module = next(iter(factors["unet"]))
    written = _weights(output, "unet")[f"{module}.weight"]
    pipe = DiffusionPipeline.from_pretrained(output, torch_dtype=written.dtype)
    assert torch.equal(pipe.unet.state_dict()[f"{module}.weight"], written)
    latents = pipe(
        "a tiny cat",
        num_inference_steps=1,
        output_type="latent",
        height=8,
        width=8,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert latents.shape == (1, 4, 8, 8) and bool(torch.isfinite(latents).all())


def test_sdxl_two_text_encoders_from_kohya_te1_te2(sdxl_dir: Path, tmp_path: Path) -> None:
    factors = _factors(sdxl_dir, seed=1)
    assert factors.keys() == {"unet", "text_encoder", "text_encoder_2"}
    for name in ("kohya", "peft"):
        lora = _WRITERS[name](tmp_path / f"{name}.safetensors", factors)
        output = tmp_path / f"out-{name}"
        assert _fuse(sdxl_dir, lora, output) == EXIT_OK
        _assert_fused_as_oracle(sdxl_dir, output, factors)


def test_the_console_script_fuses_a_pipeline(sdxl_dir: Path, tmp_path: Path) -> None:
    lora = _kohya_file(tmp_path / "lora.safetensors", _factors(sdxl_dir, seed=2))
    output = tmp_path / "out"
    script = Path(sys.executable).parent / "safemerge"
    done = subprocess.run(
        [str(script), "fuse", str(sdxl_dir), str(lora), "-o", str(output), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == EXIT_OK, done.stderr
    summary = json.loads(done.stdout)
    assert {layer["name"].split(".", 1)[0] for layer in summary["layers"]} == {
        "unet",
        "text_encoder",
        "text_encoder_2",
    }
    assert (output / "model_index.json").read_bytes() == (
        sdxl_dir / "model_index.json"
    ).read_bytes()


def test_keys_matching_nothing_are_refused_with_their_list_and_nothing_written(
    sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factors = _factors(sd_dir)
    lora = _kohya_file(tmp_path / "lora.safetensors", factors)
    tensors = {key: value for key, value in _read(lora).items()}
    strays = ("lora_unet_down_blocks_9_attn1_to_q", "lora_te_text_model_final_mlp")
    for stray in strays:
        tensors[f"{stray}.lora_down.weight"] = torch.ones(2, 8)
        tensors[f"{stray}.lora_up.weight"] = torch.ones(8, 2)
    save_file(tensors, str(lora))
    output = tmp_path / "out"
    assert _fuse(sd_dir, lora, output) == EXIT_INPUT
    error = capsys.readouterr().err
    assert all(stray in error for stray in strays) and "no base weight matches" in error
    assert not output.exists() and leftover_temporaries(output) == []


def test_a_nan_in_the_lora_is_refused_and_nothing_written(
    sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factors = _factors(sd_dir)
    # In the unet, written after the text encoder: a component already written is dropped.
    module = list(factors["unet"])[-2]
    factors["unet"][module][1][0, 0] = float("nan")
    lora = _peft_file(tmp_path / "lora.safetensors", factors)
    output = tmp_path / "out"
    assert _fuse(sd_dir, lora, output) == EXIT_CHECK_FAILED
    error = capsys.readouterr().err
    assert module in error and "NaN" in error
    assert not output.exists() and leftover_temporaries(output) == []


def test_fused_weights_agree_with_diffusers_fuse_lora(sd_dir: Path, tmp_path: Path) -> None:
    """diffusers' own ``load_lora_weights`` + ``fuse_lora`` gives the same weights, within
    both merges' bounds.

    diffusers casts the LoRA factors to the pipeline's dtype on loading (each within
    ``u_d``, so the product within ``(2 u_d + u_d**2) |c| |B| @ |A|``), PEFT multiplies in
    float32 on the CPU, casts the delta to the weight's dtype (``u_d`` of it) and adds it
    there (``u_d`` of the sum): rounded twice where safemerge rounds once.

    One alpha for every layer: diffusers 0.42 names the ``alpha_pattern`` it builds from a
    kohya file's per-layer alphas after the converted keys
    (``"...attn1.processor.to_q_lora.down.weight"``), which match no module, so every layer
    gets the most common alpha (alpha 2 on a layer fused at alpha 1 doubles its delta);
    safemerge applies each layer's own alpha, as kohya defines it.
    """
    from diffusers import DiffusionPipeline

    factors = _factors(sd_dir, seed=3, alphas=(2.0,))
    lora = _kohya_file(tmp_path / "lora.safetensors", factors)
    output = tmp_path / "out"
    assert _fuse(sd_dir, lora, output) == EXIT_OK
    dtype = next(iter(_weights(sd_dir, "unet").values())).dtype
    pipe = DiffusionPipeline.from_pretrained(sd_dir, torch_dtype=dtype)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    # Fused, the LoRA layers stay: each wraps its merged weight as base_layer.
    theirs = {
        component: {
            name.replace(".base_layer.", "."): tensor
            for name, tensor in getattr(pipe, component).state_dict().items()
        }
        for component in factors
    }
    for component, modules in factors.items():
        base, ours = _weights(sd_dir, component), _weights(output, component)
        for module, (lora_A, lora_B, alpha) in modules.items():
            name = f"{module}.weight"
            exact, accumulation, bound, product = _oracle(base[name], lora_A, lora_B, alpha)
            u_d = _UNIT_ROUNDOFF[dtype]
            delta = (exact - base[name].double()).abs()
            factors_rounding = (2 * u_d + u_d**2) * product if dtype != torch.float32 else 0.0
            product_error = accumulation + factors_rounding
            delta_error = product_error + u_d * (delta + product_error)
            their_bound = delta_error + u_d * (exact.abs() + delta_error)
            their = theirs[component][name].double()
            assert float(((their - exact).abs() / their_bound).max()) <= 1.0, name
            assert bool(((ours[name].double() - their).abs() <= bound + their_bound).all())


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
