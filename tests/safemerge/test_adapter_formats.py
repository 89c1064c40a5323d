"""safemerge.adapter_formats: PEFT, kohya and old diffusers adapters mapped onto a base."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from safemerge import (
    AdapterConfigError,
    AdapterFormatError,
    AdapterSet,
    CheckpointError,
    LoraAdapter,
    load_adapter,
    open_checkpoint,
    write_peft_adapter,
)
from safemerge.io.adapter_formats import pattern_key
from safemerge.io.atomic import save_tensors

# A small base model's weight shapes: Linear (out, in), an embedding (num, dim), a conv
# (out, in, kh, kw) and a GPT-2 style Conv1D stored (in, out).
BASE: dict[str, tuple[int, ...]] = {
    "model.embed.weight": (10, 6),
    "model.layers.0.q.weight": (8, 6),
    "model.layers.0.q.bias": (8,),
    "model.layers.0.k.weight": (8, 6),
    "model.layers.1.q.weight": (8, 6),
    "model.layers.1.q.bias": (8,),
    "model.layers.1.k.weight": (8, 6),
    "model.conv.weight": (4, 3, 3, 3),
    "model.h.0.c_attn.weight": (6, 12),
    "model.h.0.c_attn.bias": (12,),
}
P = "base_model.model."


def _ab(rank: int, fan_in: int, fan_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rank, fan_in, generator=generator),
        torch.randn(fan_out, rank, generator=generator),
    )


def _peft_dir(directory: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "adapter_model.safetensors", tensors)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return directory


def _linear_keys(
    module: str, rank: int, seed: int = 0, *, prefix: str = P
) -> dict[str, torch.Tensor]:
    lora_A, lora_B = _ab(rank, 6, 8, seed)
    return {f"{prefix}{module}.lora_A.weight": lora_A, f"{prefix}{module}.lora_B.weight": lora_B}


def _format_error(path: Path, base: Any = BASE) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(path, base=base)
    return caught.value


def _problems(error: AdapterFormatError) -> dict[str, str]:
    return dict(error.problems)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# -- PEFT ------------------------------------------------------------------------------------


def test_peft_directory_round_trip(tmp_path: Path) -> None:
    layers = {
        "model.layers.0.q.weight": LoraAdapter(*_ab(2, 6, 8, 1), alpha=4.0),
        "model.layers.1.q.weight": LoraAdapter(*_ab(3, 6, 8, 2), alpha=4.0),
        "model.layers.0.k.weight": LoraAdapter(*_ab(2, 6, 8, 3), alpha=1.5),
        "model.embed.weight": LoraAdapter(*_ab(2, 10, 6, 4), alpha=4.0),
        "model.conv.weight": LoraAdapter(
            torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1), alpha=4.0
        ),
    }
    directory = write_peft_adapter(
        tmp_path / "adapter",
        layers,
        config={"base_model_name_or_path": "toy"},
        kinds={"model.embed.weight": "embedding"},
    )
    assert directory == tmp_path / "adapter"
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 4)
    assert config["base_model_name_or_path"] == "toy"
    assert config["target_modules"] == sorted(name.removesuffix(".weight") for name in layers)
    assert config["rank_pattern"] == {re.escape("model.layers.1.q"): 3}
    assert config["alpha_pattern"] == {re.escape("model.layers.0.k"): 1.5}
    loaded = load_adapter(directory, base=BASE)
    assert isinstance(loaded, AdapterSet)
    assert (loaded.format, loaded.path) == ("peft", directory)
    assert loaded.layers.keys() == layers.keys()
    for name, adapter in layers.items():
        got = loaded.layers[name]
        assert _bits_equal(got.lora_A, adapter.lora_A) and _bits_equal(got.lora_B, adapter.lora_B)
        assert (got.rank, got.scale) == (adapter.rank, adapter.scale)
    assert loaded.kinds == {
        "model.layers.0.q.weight": "linear",
        "model.layers.1.q.weight": "linear",
        "model.layers.0.k.weight": "linear",
        "model.embed.weight": "embedding",
        "model.conv.weight": "conv2d",
    }
    assert loaded.sources["model.conv.weight"] == "model.conv"
    weights = (directory / "adapter_model.safetensors").read_bytes()
    assert loaded.digest == hashlib.sha256(weights).hexdigest()
    assert loaded.config["alpha_pattern"] == config["alpha_pattern"]
    described = loaded.describe()
    assert described.startswith(f"peft adapter {directory}: 5 layer(s)")
    assert "rank 2 (4), 3 (1)" in described and "embedding" in described and "conv2d" in described
    assert loaded.digest[:12] in described


def test_peft_options_rslora_bias_dora_fan_in_fan_out(tmp_path: Path) -> None:
    lora_A, lora_B = _ab(4, 6, 12)
    tensors = {
        f"{P}model.h.0.c_attn.lora_A.weight": lora_A,
        f"{P}model.h.0.c_attn.lora_B.weight": lora_B,
        f"{P}model.h.0.c_attn.lora_B.bias": torch.ones(12),
        f"{P}model.h.0.c_attn.lora_magnitude_vector": torch.full((12,), 2.0),
    }
    directory = _peft_dir(
        tmp_path / "a",
        tensors,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        lora_bias=True,
        use_dora=True,
        fan_in_fan_out=True,
    )
    loaded = load_adapter(directory, base=BASE)
    adapter = loaded.layers["model.h.0.c_attn.weight"]
    assert adapter.scale == 8 / math.sqrt(4)
    assert adapter.fan_in_fan_out and loaded.kinds["model.h.0.c_attn.weight"] == "fan_in_fan_out"
    assert adapter.lora_bias is not None and torch.equal(adapter.lora_bias, torch.ones(12))
    assert adapter.magnitude is not None and torch.equal(adapter.magnitude, torch.full((12,), 2.0))
    described = loaded.describe()
    assert all(word in described for word in ("rsLoRA on 1", "DoRA on 1", "lora_bias on 1"))


def test_conv_dora_magnitude_keeps_peft_shape(tmp_path: Path) -> None:
    tensors = {
        f"{P}model.conv.lora_A.weight": torch.randn(2, 3, 3, 3),
        f"{P}model.conv.lora_B.weight": torch.randn(4, 2, 1, 1),
        f"{P}model.conv.lora_magnitude_vector": torch.ones(1, 4, 1, 1),
    }
    loaded = load_adapter(_peft_dir(tmp_path / "a", tensors, r=2, use_dora=True), base=BASE)
    adapter = loaded.layers["model.conv.weight"]
    assert adapter.kernel_size == (3, 3) and adapter.magnitude is not None
    assert adapter.magnitude.shape == (1, 4, 1, 1)


def test_embedding_keys_and_adapter_name_infix(tmp_path: Path) -> None:
    lora_A, lora_B = _ab(2, 10, 6)
    tensors = {
        f"{P}model.embed.lora_embedding_A.default": lora_A,
        f"{P}model.embed.lora_embedding_B.default": lora_B,
        f"{P}model.layers.0.q.lora_A.default.weight": _ab(2, 6, 8)[0],
        f"{P}model.layers.0.q.lora_B.default.weight": _ab(2, 6, 8)[1],
    }
    loaded = load_adapter(_peft_dir(tmp_path / "a", tensors, r=2, lora_alpha=2), base=BASE)
    assert loaded.kinds == {"model.embed.weight": "embedding", "model.layers.0.q.weight": "linear"}
    assert torch.equal(loaded.layers["model.embed.weight"].lora_A, lora_A)


def test_two_adapter_names_in_one_file_refused(tmp_path: Path) -> None:
    tensors = {
        **{
            k.replace("lora_A.", "lora_A.one."): v
            for k, v in _linear_keys("model.layers.0.q", 2).items()
        },
        **{
            k.replace("lora_A.", "lora_A.two."): v
            for k, v in _linear_keys("model.layers.1.q", 2).items()
        },
    }
    tensors = {k.replace("lora_B.", "lora_B.one."): v for k, v in tensors.items()}
    error = _format_error(_peft_dir(tmp_path / "a", tensors, r=2))
    assert "several adapters (one, two)" in str(error)


@pytest.mark.parametrize(
    ("patterns", "module", "expected"),
    [
        (["q"], "model.layers.0.q", "q"),
        (["layers.0.q"], "model.layers.0.q", "layers.0.q"),
        (["model.layers.0.q"], "model.layers.0.q", "model.layers.0.q"),
        (["0.q"], "model.layers.10.q", None),  # "10.q" does not end with ".0.q"
        ([r"layers\.[01]\.k"], "model.layers.1.k", r"layers\.[01]\.k"),
        (["k"], "model.layers.0.q", None),
        (["q", "layers.0.q"], "model.layers.0.q", "q"),  # the first match wins, as in PEFT
        (["odel.layers.0.q"], "model.layers.0.q", None),  # no partial component
    ],
)
def test_pattern_matching_is_peft_s(patterns: list[str], module: str, expected: str | None) -> None:
    assert pattern_key(patterns, module) == expected
    other = pytest.importorskip("peft.utils.other")
    assert other.get_pattern_key(patterns, module) == (expected or module)


def test_rank_and_alpha_patterns_from_the_config(tmp_path: Path) -> None:
    tensors = {
        **_linear_keys("model.layers.0.q", 4, 1),
        **_linear_keys("model.layers.1.q", 2, 2),
        **_linear_keys("model.layers.0.k", 2, 3),
    }
    directory = _peft_dir(
        tmp_path / "a",
        tensors,
        r=2,
        lora_alpha=4,
        rank_pattern={"layers.0.q": 4},
        alpha_pattern={r"layers\.\d\.q": 16},
    )
    loaded = load_adapter(directory, base=BASE)
    scales = {name: adapter.scale for name, adapter in loaded.layers.items()}
    assert scales == {
        "model.layers.0.q.weight": 16 / 4,
        "model.layers.1.q.weight": 16 / 2,
        "model.layers.0.k.weight": 4 / 2,
    }


def test_config_rank_disagreeing_with_the_tensors(tmp_path: Path) -> None:
    tensors = {**_linear_keys("model.layers.0.q", 4), **_linear_keys("model.layers.1.q", 2)}
    directory = _peft_dir(tmp_path / "a", tensors, r=2, rank_pattern={"layers.1.q": 3})
    problems = _problems(_format_error(directory))
    assert problems[f"{P}model.layers.0.q"].startswith(
        "rank 4 in the file (lora_A shape (4, 6)) but adapter config says r=2"
    )
    assert "says rank_pattern['layers.1.q']=3" in problems[f"{P}model.layers.1.q"]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"r": 0}, "r=0: a LoRA rank must be a positive integer"),
        ({"r": -4}, "r=-4: a LoRA rank must be a positive integer"),
        ({"r": 2, "rank_pattern": {"q": 0}}, "rank_pattern['q']=0: a LoRA rank"),
        ({"r": 2.5}, "r=2.5"),
        ({"r": 2, "lora_alpha": float("nan")}, "lora_alpha=nan: lora_alpha must be a finite"),
        ({"r": 2, "peft_type": "LOHA"}, "peft_type='LOHA'; safemerge merges LoRA adapters only"),
        ({"r": 2, "target_parameters": ["experts.w"]}, "target_parameters=['experts.w'] is set"),
        ({"r": 2, "alpha_pattern": {"(": 2}}, "pattern '(' is not a valid regular expression"),
    ],
)
def test_unusable_configs(tmp_path: Path, config: dict[str, Any], fragment: str) -> None:
    directory = _peft_dir(tmp_path / "a", _linear_keys("model.layers.0.q", 2), **config)
    with pytest.raises(AdapterConfigError, match=re.escape(fragment)):
        load_adapter(directory, base=BASE)


def test_zero_rank_tensors(tmp_path: Path) -> None:
    tensors = {
        f"{P}model.layers.0.q.lora_A.weight": torch.zeros(0, 6),
        f"{P}model.layers.0.q.lora_B.weight": torch.zeros(8, 0),
    }
    directory = _peft_dir(tmp_path / "a", tensors, r=2)
    with pytest.raises(
        AdapterConfigError, match=r"has layers of rank 0: .*lora_A.weight \(shape \(0, 6\)\)"
    ):
        load_adapter(directory, base=BASE)


def test_single_file_with_config_in_metadata(tmp_path: Path) -> None:
    tensors = {
        **_linear_keys("layers.0.q", 2, prefix="model."),
        **_linear_keys("layers.0.k", 4, prefix="model."),
    }
    config = {"r": 2, "lora_alpha": 8, "rank_pattern": {"k": 4}}
    path = tmp_path / "adapter.safetensors"
    save_tensors(path, tensors, {"adapter_config": json.dumps(config)})
    loaded = load_adapter(path, base=BASE)
    assert loaded.format == "peft" and loaded.config == config
    assert {n: a.scale for n, a in loaded.layers.items()} == {
        "model.layers.0.q.weight": 4.0,
        "model.layers.0.k.weight": 2.0,
    }


def test_diffusers_style_metadata_config_per_component(tmp_path: Path) -> None:
    tensors = {
        **_linear_keys("layers.0.q", 2, prefix="unet."),
        **_linear_keys("layers.1.q", 4, prefix="text_encoder."),
    }
    metadata = {
        "unet.r": 2,
        "unet.lora_alpha": 2,
        "text_encoder.r": 8,
        "text_encoder.lora_alpha": 16,
        # Patterns name modules inside the component: "layers.1.q", not "text_encoder.layers.1.q".
        "text_encoder.rank_pattern": {"^layers.1.q": 4},
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_tensors(path, tensors, {"lora_adapter_metadata": json.dumps(metadata)})
    bare = {name.removeprefix("model."): shape for name, shape in BASE.items()}
    loaded = load_adapter(path, base=bare)
    assert {n: a.scale for n, a in loaded.layers.items()} == {
        "layers.0.q.weight": 1.0,
        "layers.1.q.weight": 4.0,
    }


def test_single_file_with_config_beside_it(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path / "a", _linear_keys("model.layers.0.q", 2), r=2, lora_alpha=6)
    loaded = load_adapter(directory / "adapter_model.safetensors", base=BASE)
    assert loaded.layers["model.layers.0.q.weight"].scale == 3.0


def test_peft_file_without_config_refused(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    save_tensors(path, _linear_keys("model.layers.0.q", 2))
    with pytest.raises(
        AdapterConfigError, match=r"has no config: .*scale \(lora_alpha / r\) is unknown"
    ):
        load_adapter(path, base=BASE)


def test_base_as_checkpoint_or_state_dict(tmp_path: Path) -> None:
    directory = _peft_dir(tmp_path / "a", _linear_keys("model.layers.0.q", 2), r=2)
    save_tensors(tmp_path / "model.safetensors", {n: torch.zeros(s) for n, s in BASE.items()})
    with open_checkpoint(tmp_path / "model.safetensors") as checkpoint:
        from_checkpoint = load_adapter(directory, base=checkpoint)
    state_dict = {n: torch.zeros(s) for n, s in BASE.items()}
    from_state_dict = load_adapter(directory, base=state_dict)
    assert (
        from_checkpoint.layers.keys()
        == from_state_dict.layers.keys()
        == {"model.layers.0.q.weight"}
    )


def test_base_with_an_extra_prefix_or_adapter_with_one(tmp_path: Path) -> None:
    adapter = _peft_dir(tmp_path / "a", _linear_keys("layers.0.k", 2), r=2)
    loaded = load_adapter(adapter, base=BASE)  # base names carry "model."
    assert loaded.layers.keys() == {"model.layers.0.k.weight"}
    bare = {name.removeprefix("model."): shape for name, shape in BASE.items()}
    prefixed = _peft_dir(tmp_path / "b", _linear_keys("model.layers.0.k", 2), r=2)
    assert load_adapter(prefixed, base=bare).layers.keys() == {"layers.0.k.weight"}


def test_nan_adapter_loads_untouched(tmp_path: Path) -> None:
    lora_A, lora_B = _ab(2, 6, 8)
    lora_A = lora_A.to(torch.float16)
    lora_A[0, 3] = float("nan")
    lora_B[5, 1] = float("inf")
    tensors = {
        f"{P}model.layers.0.q.lora_A.weight": lora_A,
        f"{P}model.layers.0.q.lora_B.weight": lora_B,
    }
    loaded = load_adapter(_peft_dir(tmp_path / "a", tensors, r=2), base=BASE)
    adapter = loaded.layers["model.layers.0.q.weight"]
    assert _bits_equal(adapter.lora_A, lora_A) and _bits_equal(adapter.lora_B, lora_B)


# -- every misfit, all at once ---------------------------------------------------------------


def test_all_offending_keys_in_one_error(tmp_path: Path) -> None:
    lora_A, lora_B = _ab(2, 5, 8)
    tensors = {
        **_linear_keys("model.layers.0.q", 2),  # fine
        **_linear_keys("model.nowhere.q", 2),  # matches nothing
        f"{P}model.layers.0.k.lora_A.weight": lora_A,  # in_features 5, base has 6
        f"{P}model.layers.0.k.lora_B.weight": lora_B,
        f"{P}model.layers.1.q.lora_A.weight": lora_A,  # no lora_B
        f"{P}model.classifier.weight": torch.zeros(2),  # modules_to_save: not LoRA
    }
    error = _format_error(_peft_dir(tmp_path / "a", tensors, r=2))
    problems = _problems(error)
    assert set(problems) == {
        f"{P}model.nowhere.q",
        f"{P}model.layers.0.k",
        f"{P}model.layers.1.q",
        f"{P}model.classifier.weight",
    }
    assert problems[f"{P}model.nowhere.q"].startswith(
        "no base weight matches: looked for 'model.nowhere.q.weight'"
    )
    assert problems[f"{P}model.layers.0.k"] == (
        "shape mismatch: base weight 'model.layers.0.k.weight' is (8, 6) but the adapter "
        "(lora_A (2, 5), lora_B (8, 2)) needs a weight (8, 5)"
    )
    assert problems[f"{P}model.layers.1.q"].startswith(
        f"half a pair: has {P}model.layers.1.q.lora_A.weight but no lora_B (up)"
    )
    assert problems[f"{P}model.classifier.weight"].startswith("not a LoRA tensor")
    message = str(error)
    assert message.startswith(f"adapter {tmp_path / 'a'} does not fit the base model: 4 key(s)")
    assert "nothing was loaded" in message and "trained for this base model" in message
    assert issubclass(AdapterFormatError, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.problems) == (message, error.problems)


def test_ambiguous_key(tmp_path: Path) -> None:
    base = {"text.encoder.q.weight": (8, 6), "vision.encoder.q.weight": (8, 6)}
    directory = _peft_dir(tmp_path / "a", _linear_keys("encoder.q", 2), r=2)
    problems = _problems(_format_error(directory, base))
    assert problems[f"{P}encoder.q"] == (
        "ambiguous: matches 2 base weights ('text.encoder.q.weight', 'vision.encoder.q.weight'); "
        "rename the adapter's keys to the full module path"
    )


def test_many_problems_are_capped_with_a_count(tmp_path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for i in range(25):
        tensors.update(_linear_keys(f"missing.{i}", 2))
    error = _format_error(_peft_dir(tmp_path / "a", tensors, r=2))
    assert len(error.problems) == 25
    assert "25 key(s) refused" in str(error) and "... and 5 more" in str(error)


def test_swapped_orientation_hints_fan_in_fan_out(tmp_path: Path) -> None:
    tensors = {
        f"{P}model.h.0.c_attn.lora_A.weight": _ab(2, 6, 12)[0],
        f"{P}model.h.0.c_attn.lora_B.weight": _ab(2, 6, 12)[1],
    }
    problems = _problems(_format_error(_peft_dir(tmp_path / "a", tensors, r=2)))
    assert problems[f"{P}model.h.0.c_attn"].endswith(
        "the base stores it as (in, out), GPT-2 Conv1D style: if so, set fan_in_fan_out=true "
        "in the adapter config"
    )


def test_bias_and_magnitude_must_agree_with_config_and_base(tmp_path: Path) -> None:
    tensors = {
        **_linear_keys("model.layers.0.q", 2),
        f"{P}model.layers.0.q.lora_B.bias": torch.ones(8),
        **_linear_keys("model.layers.0.k", 2),
        f"{P}model.layers.0.k.lora_B.bias": torch.ones(8),  # base k has no bias
    }
    problems = _problems(_format_error(_peft_dir(tmp_path / "a", tensors, r=2)))
    assert (
        problems[f"{P}model.layers.0.q"] == "has a lora_B.bias but the config says lora_bias=false"
    )
    problems = _problems(_format_error(_peft_dir(tmp_path / "b", tensors, r=2, lora_bias=True)))
    assert set(problems) == {f"{P}model.layers.0.k"}
    assert "has no bias ('model.layers.0.k.bias') to add it to" in problems[f"{P}model.layers.0.k"]
    dora = _peft_dir(tmp_path / "c", _linear_keys("model.layers.0.q", 2), r=2, use_dora=True)
    assert _problems(_format_error(dora)) == {
        f"{P}model.layers.0.q": "the config says use_dora=true but the layer has no lora_magnitude_vector"
    }


def test_not_an_adapter_and_mixed_formats(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"weight": torch.ones(2)})
    error = _format_error(path)
    assert "no LoRA keys found (first keys: weight)" in str(error)
    save_tensors(
        path,
        {
            **_linear_keys("model.layers.0.q", 2),
            "lora_unet_layers_0_q.lora_down.weight": torch.ones(2, 6),
        },
    )
    assert "keys of several formats are mixed" in str(_format_error(path))


def test_pickled_adapter_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2}))
    torch.save(_linear_keys("model.layers.0.q", 2), tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles") as caught:
        load_adapter(tmp_path, base=BASE)
    assert caught.value.reason == "pickled"
    with pytest.raises(CheckpointError, match="no such adapter file or directory"):
        load_adapter(tmp_path / "nowhere", base=BASE)


# -- kohya -----------------------------------------------------------------------------------

SD_BASE: dict[str, tuple[int, ...]] = {
    "unet.down_blocks.0.attentions.0.proj_in.weight": (8, 4, 1, 1),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": (8, 8),
    "unet.down_blocks.0.resnets.0.conv1.weight": (8, 4, 3, 3),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": (12, 6),
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight": (24, 6),
}


def test_kohya_file(tmp_path: Path) -> None:
    down, up = _ab(4, 8, 8)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(
            2.0
        ),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(0.0),  # 0: alpha = rank
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(2, 4, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(8, 2, 1, 1),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0, dtype=torch.bfloat16),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 6),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(12, 2),
        # no alpha: scale 1
    }
    path = tmp_path / "kohya.safetensors"
    save_tensors(path, tensors, {"ss_network_dim": "4"})
    loaded = load_adapter(path, base=SD_BASE)
    assert loaded.format == "kohya" and loaded.config == {"ss_network_dim": "4"}
    scales = {name: adapter.scale for name, adapter in loaded.layers.items()}
    assert scales == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": 0.5,
        "unet.down_blocks.0.attentions.0.proj_in.weight": 1.0,
        "unet.down_blocks.0.resnets.0.conv1.weight": 0.5,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": 1.0,
    }
    assert loaded.kinds["unet.down_blocks.0.resnets.0.conv1.weight"] == "conv2d"
    assert loaded.sources["unet.down_blocks.0.resnets.0.conv1.weight"] == (
        "down_blocks_0_resnets_0_conv1"
    )
    q = loaded.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert torch.equal(q.lora_A, down) and torch.equal(q.lora_B, up)


def test_kohya_problems(tmp_path: Path) -> None:
    base = {**SD_BASE, "unet.down_blocks_0.attentions.0.proj_in.weight": (8, 4, 1, 1)}
    tensors = {
        # flattened, two base modules read the same: ambiguous
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 4, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, 1, 1),
        "lora_unet_up_blocks_9_attn_to_k.lora_down.weight": torch.randn(2, 8),
        "lora_unet_up_blocks_9_attn_to_k.lora_up.weight": torch.randn(8, 2),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 6),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
        "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.randn(2, 2),
        "lora_te1_gone.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "kohya.safetensors"
    save_tensors(path, tensors)
    problems = _problems(_format_error(path, base))
    assert problems["lora_unet_down_blocks_0_attentions_0_proj_in"].startswith(
        "ambiguous: matches 2 base weights"
    )
    assert problems["lora_unet_up_blocks_9_attn_to_k"].startswith(
        "no base weight matches: no module name, with '.' read as '_', is (or ends with) "
        "'up_blocks_9_attn_to_k'"
    )
    assert "no lora_B (up)" in problems["lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    assert problems["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"].startswith(
        "not a LoRA tensor"
    )
    assert problems["lora_te1_gone.alpha"].startswith("an alpha for a layer with no lora_down")


# -- old diffusers ---------------------------------------------------------------------------


def test_old_diffusers_file(tmp_path: Path) -> None:
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"{block}.processor.to_q_lora.down.weight": torch.randn(4, 8),
        f"{block}.processor.to_q_lora.up.weight": torch.randn(8, 4),
        f"{block}.processor.to_out_lora.down.weight": torch.randn(4, 8),
        f"{block}.processor.to_out_lora.up.weight": torch.randn(8, 4),
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.randn(2, 4, 3, 3),
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": torch.randn(8, 2, 1, 1),
        "unet.down_blocks.0.resnets.0.conv1.alpha": torch.tensor(4.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": (
            torch.randn(2, 6)
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": (
            torch.randn(12, 2)
        ),
    }
    base = {name.removeprefix("unet."): shape for name, shape in SD_BASE.items()}  # a bare UNet
    base["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"] = (12, 6)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    alphas = {f"{block}.processor.to_q_lora": 2, f"{block}.to_out.0": 8}
    save_tensors(path, tensors, {"network_alphas": json.dumps(alphas)})
    loaded = load_adapter(path, base=base)
    assert loaded.format == "diffusers"
    assert {name: adapter.scale for name, adapter in loaded.layers.items()} == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": 0.5,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight": 2.0,
        "down_blocks.0.resnets.0.conv1.weight": 2.0,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": 1.0,
    }


def test_old_diffusers_half_pair_and_stray_alpha(tmp_path: Path) -> None:
    tensors = {
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.randn(2, 4, 3, 3),
        "unet.mid_block.attn.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "lora.safetensors"
    save_tensors(path, tensors)
    problems = _problems(_format_error(path, SD_BASE))
    assert "no lora_B (up)" in problems["unet.down_blocks.0.resnets.0.conv1"]
    assert problems["unet.mid_block.attn.alpha"].startswith("an alpha for a layer with no lora")


# -- writing ---------------------------------------------------------------------------------


def test_write_refuses_what_one_peft_config_cannot_hold(tmp_path: Path) -> None:
    plain = LoraAdapter(*_ab(2, 6, 8))
    rslora = LoraAdapter(*_ab(2, 6, 8), use_rslora=True)
    with pytest.raises(AdapterConfigError, match="holds one use_rslora for all layers, but 1 of 2"):
        write_peft_adapter(tmp_path, {"a.weight": plain, "b.weight": rslora})
    with pytest.raises(AdapterConfigError, match=re.escape("ending in '.weight'; got 'a.bias'")):
        write_peft_adapter(tmp_path, {"a.bias": plain})
    with pytest.raises(AdapterConfigError, match="at least one layer"):
        write_peft_adapter(tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def test_write_patterns_survive_peft_suffix_matching(tmp_path: Path) -> None:
    # A pattern for "a.q" also matches "x.a.q" in PEFT: the writer must pin "x.a.q" too.
    layers = {
        "a.q.weight": LoraAdapter(*_ab(4, 6, 8), alpha=3.0),
        "x.a.q.weight": LoraAdapter(*_ab(2, 6, 8), alpha=5.0),
        "y.a.q.weight": LoraAdapter(*_ab(2, 6, 8), alpha=5.0),
        "z.k.weight": LoraAdapter(*_ab(2, 6, 8), alpha=5.0),
    }
    directory = write_peft_adapter(tmp_path / "a", layers)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 5
    loaded = load_adapter(directory, base={name: (8, 6) for name in layers})
    for name, adapter in layers.items():
        assert (loaded.layers[name].rank, loaded.layers[name].scale) == (
            adapter.rank,
            adapter.scale,
        )


def test_written_adapter_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(6, 8)
            self.k = nn.Linear(6, 8)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.layers = nn.ModuleList([Block(), Block()])
            self.conv = nn.Conv2d(3, 4, 3)

    layers = {
        "embed.weight": LoraAdapter(*_ab(2, 10, 6, 1), alpha=3.0, use_rslora=True),
        "layers.0.q.weight": LoraAdapter(*_ab(4, 6, 8, 2), alpha=8.0, use_rslora=True),
        "layers.1.q.weight": LoraAdapter(*_ab(2, 6, 8, 3), alpha=8.0, use_rslora=True),
        "layers.1.k.weight": LoraAdapter(*_ab(2, 6, 8, 4), alpha=1.0, use_rslora=True),
        "conv.weight": LoraAdapter(
            torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1), alpha=8.0, use_rslora=True
        ),
    }
    directory = write_peft_adapter(
        tmp_path / "adapter", layers, kinds={"embed.weight": "embedding"}
    )
    model = peft.PeftModel.from_pretrained(Toy(), directory)
    inner = model.base_model.model
    for name, adapter in layers.items():
        module = inner.get_submodule(name.removesuffix(".weight"))
        if name == "embed.weight":
            lora_A, lora_B = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
        else:
            lora_A, lora_B = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert torch.equal(lora_A, adapter.lora_A) and torch.equal(lora_B, adapter.lora_B)
        assert module.scaling["default"] == pytest.approx(adapter.scale, rel=1e-12)
    loaded = load_adapter(directory, base=Toy().state_dict())
    assert {n: a.scale for n, a in loaded.layers.items()} == {n: a.scale for n, a in layers.items()}


def test_gpt2_style_conv1d_adapter_with_bias_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = pytorch_utils.Conv1D(12, 6)  # weight (in 6, out 12)
            self.c_proj = pytorch_utils.Conv1D(6, 12)

    bias = torch.randn(12)
    layers = {
        "c_attn.weight": LoraAdapter(
            *_ab(2, 6, 12), alpha=4.0, fan_in_fan_out=True, lora_bias=bias
        ),
        "c_proj.weight": LoraAdapter(*_ab(2, 12, 6), alpha=4.0, fan_in_fan_out=True),
    }
    directory = write_peft_adapter(tmp_path / "adapter", layers)
    inner = peft.PeftModel.from_pretrained(Block(), directory).base_model.model
    assert inner.c_attn.fan_in_fan_out
    assert torch.equal(inner.c_attn.lora_B["default"].bias, bias)
    loaded = load_adapter(directory, base=Block().state_dict())
    assert loaded.kinds == {"c_attn.weight": "fan_in_fan_out", "c_proj.weight": "fan_in_fan_out"}
    attn = loaded.layers["c_attn.weight"]
    assert attn.lora_bias is not None and torch.equal(attn.lora_bias, bias)


def test_adapter_saved_by_peft_reads_as_peft_applies_it(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.q = nn.Linear(6, 8)
            self.k = nn.Linear(6, 8)
            self.conv = nn.Conv2d(3, 4, 3)

    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["embed", "q", "k", "conv"],
        rank_pattern={"q": 3},
        alpha_pattern={"k": 7},
        use_dora=True,
        init_lora_weights=False,  # random B, so the test compares something
    )
    model = peft.get_peft_model(Toy(), config)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter", base=Toy().state_dict())
    inner = model.base_model.model
    assert loaded.kinds == {
        "embed.weight": "embedding",
        "q.weight": "linear",
        "k.weight": "linear",
        "conv.weight": "conv2d",
    }
    for name, adapter in loaded.layers.items():
        module = inner.get_submodule(name.removesuffix(".weight"))
        if name == "embed.weight":
            lora_A, lora_B = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
        else:
            lora_A, lora_B = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert torch.equal(adapter.lora_A, lora_A) and torch.equal(adapter.lora_B, lora_B)
        assert adapter.scale == pytest.approx(module.scaling["default"], rel=1e-12)
        magnitude = module.lora_magnitude_vector["default"].weight
        assert adapter.magnitude is not None and torch.equal(adapter.magnitude, magnitude)
    assert loaded.layers["q.weight"].rank == 3 and loaded.layers["k.weight"].scale == 3.5


def test_adapter_for_the_real_model(tmp_path: Path, minilm: Path) -> None:
    path = minilm / "model" / "model.safetensors"
    layers = {
        f"encoder.layer.{i}.attention.self.{name}.weight": LoraAdapter(
            *_ab(4, 384, 384, i), alpha=8.0
        )
        for i in range(6)
        for name in ("query", "value")
    }
    layers["embeddings.word_embeddings.weight"] = LoraAdapter(*_ab(4, 30522, 384), alpha=8.0)
    directory = write_peft_adapter(
        tmp_path / "adapter", layers, kinds={"embeddings.word_embeddings.weight": "embedding"}
    )
    with open_checkpoint(path) as checkpoint:
        loaded = load_adapter(directory, base=checkpoint)
    assert loaded.layers.keys() == layers.keys()
    assert loaded.kinds["embeddings.word_embeddings.weight"] == "embedding"
    assert {adapter.scale for adapter in loaded.layers.values()} == {2.0}
    # The same adapter saved by a model wrapped one level deeper ("bert.") still maps.
    deeper = write_peft_adapter(
        tmp_path / "deeper",
        {f"bert.{name}": adapter for name, adapter in layers.items()},
        kinds={"bert.embeddings.word_embeddings.weight": "embedding"},
    )
    with open_checkpoint(path) as checkpoint:
        assert load_adapter(deeper, base=checkpoint).layers.keys() == layers.keys()


def test_kohya_prefix_picks_the_model_part(tmp_path: Path) -> None:
    # SDXL: both text encoders have the same module names; lora_te1_/lora_te2_ tell them apart.
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    base = {
        f"text_encoder.{q}.weight": (8, 6),
        f"text_encoder_2.{q}.weight": (8, 6),
        "unet.mid_block.attentions.0.proj_in.weight": (8, 6),
        "unet.mid_block.attentions.0.k_proj_in.weight": (8, 6),
    }
    flat = q.replace(".", "_")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, seed in (
        ("lora_te1_", 1),
        ("lora_te2_", 2),
        ("lora_unet_mid_block_attentions_0_", 3),
    ):
        name = prefix + (flat if prefix.startswith("lora_te") else "proj_in")
        lora_A, lora_B = _ab(2, 6, 8, seed)
        tensors[f"{name}.lora_down.weight"] = lora_A
        tensors[f"{name}.lora_up.weight"] = lora_B
    path = tmp_path / "sdxl.safetensors"
    save_tensors(path, tensors)
    loaded = load_adapter(path, base=base)
    assert loaded.sources == {
        f"text_encoder.{q}.weight": flat,
        f"text_encoder_2.{q}.weight": flat,
        "unet.mid_block.attentions.0.proj_in.weight": "mid_block_attentions_0_proj_in",
    }
    assert torch.equal(loaded.layers[f"text_encoder_2.{q}.weight"].lora_A, _ab(2, 6, 8, 2)[0])
    # Without the part's own copy, a te2 key does not fall back on text_encoder's weights.
    del base[f"text_encoder_2.{q}.weight"]
    problems = _problems(_format_error(path, base))
    assert set(problems) == {f"lora_te2_{flat}"}


def test_written_dora_adapter_loads_in_peft(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.q = nn.Linear(6, 8)
            self.conv = nn.Conv2d(3, 4, 3)

    layers = {
        "embed.weight": LoraAdapter(*_ab(2, 10, 6), alpha=4.0, magnitude=torch.rand(6)),
        "q.weight": LoraAdapter(*_ab(2, 6, 8), alpha=4.0, magnitude=torch.rand(8)),
        "conv.weight": LoraAdapter(
            torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1), alpha=4.0, magnitude=torch.rand(4)
        ),
    }
    directory = write_peft_adapter(tmp_path / "a", layers, kinds={"embed.weight": "embedding"})
    assert json.loads((directory / "adapter_config.json").read_text())["use_dora"] is True
    inner = peft.PeftModel.from_pretrained(Toy(), directory).base_model.model
    for name, adapter in layers.items():
        magnitude = inner.get_submodule(name.removesuffix(".weight")).lora_magnitude_vector
        assert adapter.magnitude is not None
        assert torch.equal(magnitude["default"].weight.reshape(-1), adapter.magnitude)
    loaded = load_adapter(directory, base=Toy().state_dict())
    assert all(adapter.is_dora for adapter in loaded.layers.values())
