"""The plugin's options: each ``--safemerge-*`` flag, its ini key, and its help, in one table.

A command-line value wins over the ini key of the same name (``safemerge_impl`` for
``--safemerge-impl``). Imports only pytest: pytest loads the plugin on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from safemerge import names

QUANT_CHOICES = names.QUANT_TYPES
DTYPE_CHOICES = names.WEIGHT_DTYPES


@dataclass(frozen=True)
class Option:
    name: str  # the flag without its leading "--safemerge-"
    help: str
    default: str | None = None
    kind: str = "string"  # "string", "int", "float" or "bool"

    @property
    def flag(self) -> str:
        return f"--safemerge-{self.name}"

    @property
    def ini(self) -> str:
        return f"safemerge_{self.name.replace('-', '_')}"

    @property
    def dest(self) -> str:
        return self.ini


OPTIONS: tuple[Option, ...] = (
    Option(
        "suite",
        "run safemerge's built-in conformance suite (implied by --safemerge-impl and "
        "--safemerge-model), against safemerge's own engine unless --safemerge-impl says "
        "otherwise",
        kind="bool",
    ),
    Option(
        "peft",
        "run the PEFT contracts against the installed PEFT: its model-level merge entry "
        "points (merge_adapter, unmerge_adapter, merge_and_unload, delete_adapter, "
        "add_weighted_adapter) on tiny models, and every PEFT tuner that merges",
        kind="bool",
    ),
    Option(
        "pipeline",
        "MODULE:OBJECT, a pipeline-level LoRA fuse to check: an object with "
        "fuse_lora(pipe, lora_scale=...) and unfuse_lora(pipe), e.g. "
        "pytest_safemerge.targets.diffusers_pipeline:DIFFUSERS_PIPELINE (diffusers' own) or "
        ":SAFEMERGE_PIPELINE; checked on tiny SD pipelines with LoRAs on the UNet and the text "
        "encoder: a refused fuse leaves every component as it was, and unfuse restores it",
    ),
    Option(
        "only",
        "run only the built-in suite: deselect every other collected test",
        kind="bool",
    ),
    Option(
        "impl",
        "MODULE:OBJECT, the merge implementation under test: an object with "
        "fuse(weight, lora_A, lora_B, scale) and optionally unfuse(...) and exact_unfuse=True; "
        "with fuse_layer(layer, adapters, scale) (optionally unfuse_layer, layer_kinds) the "
        "layer suite runs too (default: safemerge's engine)",
    ),
    Option(
        "model",
        "PATH of a safetensors file or a directory of shards (model.safetensors.index.json) "
        "whose real layers the suite checks; 'tiny' generates a small model",
    ),
    Option(
        "adapter",
        "PATH of a PEFT adapter directory or safetensors file to check against "
        "--safemerge-model; 'tiny' generates one for the tiny model",
    ),
    Option(
        "layers",
        "comma-separated glob(s) of weight names to check, e.g. '*attention*,*.dense.weight' "
        "(default: a sample covering every shape; see --safemerge-max-layers)",
    ),
    Option(
        "max-layers",
        "with no --safemerge-layers, check at most this many of the model's weights, every "
        "distinct shape first (0: all)",
        default="24",
        kind="int",
    ),
    Option(
        "quant",
        f"also run the model's layers through bitsandbytes' quantized path: {'|'.join(QUANT_CHOICES)}",
    ),
    Option(
        "dtype",
        f"check the model's weights cast to this dtype ({'|'.join(DTYPE_CHOICES)}; default: "
        "each weight's own dtype)",
    ),
    Option(
        "dtypes",
        f"comma-separated weight dtypes whose cells of the tensor and layer contracts run "
        f"({names.listed(DTYPE_CHOICES)}; default: every dtype the implementation declares, "
        f"all of them when it declares none)",
    ),
    Option(
        "scale",
        "overall scale for --safemerge-adapter (PEFT's lora_scale)",
        default="1.0",
        kind="float",
    ),
    Option(
        "examples",
        "Hypothesis examples per property, shared among its cells (one per weight dtype, "
        "or per layer kind and dtype) and their kinds of case, a few at least each",
        default="100",
        kind="int",
    ),
    Option(
        "layer-examples",
        "generated adapters per model layer and property",
        default="4",
        kind="int",
    ),
    Option("device", "device for the tensors under test, e.g. cuda", default="cpu"),
    Option("report", "PATH to write a JSON report of every property and layer checked"),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("safemerge", "safemerge: conformance of LoRA merge code")
    for option in OPTIONS:
        if option.kind == "bool":
            group.addoption(option.flag, action="store_true", dest=option.dest, help=option.help)
            parser.addini(option.ini, option.help, type="bool", default=False)
        else:
            group.addoption(option.flag, dest=option.dest, default=None, help=option.help)
            parser.addini(option.ini, option.help, default=option.default)


@dataclass(frozen=True)
class Settings:
    """The plugin's options for this run, command line over ini."""

    suite: bool
    peft: bool
    pipeline: str | None
    only: bool
    impl: str | None
    model: str | None
    adapter: str | None
    layers: tuple[str, ...]
    max_layers: int
    quant: str | None
    dtype: str | None
    dtypes: tuple[str, ...] | None
    scale: float
    examples: int
    layer_examples: int
    device: str
    report: str | None

    @property
    def active(self) -> bool:
        """Whether the built-in suite is collected in this run."""
        return (
            self.suite
            or self.peft
            or self.only
            or self.impl is not None
            or self.model is not None
            or self.pipeline is not None
        )


SETTINGS_KEY = pytest.StashKey[Settings]()


def read_settings(config: pytest.Config) -> Settings:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = config.getoption(option.dest)
        if raw in (None, False):
            raw = config.getini(option.ini)
        values[option.name.replace("-", "_")] = _convert(option, raw)
    layers = values.pop("layers")
    return Settings(
        layers=tuple(g.strip() for g in (layers or "").split(",") if g.strip()), **values
    )


def _dtype_names(option: Option, text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in chosen if name not in DTYPE_CHOICES]
    if unknown or not chosen:
        raise pytest.UsageError(
            f"{option.flag}={text!r}: "
            + (f"unknown dtypes {unknown}" if unknown else "names no dtype")
            + f"; choose among {names.listed(DTYPE_CHOICES)}, e.g. {option.flag}=float32,bfloat16"
        )
    return chosen


def _convert(option: Option, raw: object) -> Any:
    if option.kind == "bool":
        return bool(raw)
    if raw in (None, ""):
        return None
    text = str(raw).strip()
    try:
        if option.kind == "int":
            value: Any = int(text)
            if value < 0:
                raise ValueError
            return value
        if option.kind == "float":
            return float(text)
    except ValueError:
        raise pytest.UsageError(
            f"{option.flag}={text!r}: expected a non-negative {option.kind}"
            f"{', e.g. ' + option.flag + '=' + str(option.default) if option.default else ''}"
        ) from None
    if option.name == "quant" and text not in QUANT_CHOICES:
        raise pytest.UsageError(f"{option.flag}={text!r}: choose one of {names.listed(QUANT_CHOICES)}")
    if option.name == "dtype" and text not in DTYPE_CHOICES:
        raise pytest.UsageError(f"{option.flag}={text!r}: choose one of {names.listed(DTYPE_CHOICES)}")
    if option.name == "dtypes":
        return _dtype_names(option, text)
    if option.name in ("impl", "pipeline") and ":" not in text:
        raise pytest.UsageError(
            f"{option.flag}={text!r}: expected MODULE:OBJECT, e.g. "
            f"{option.flag}=mypackage.merging:LORA_MERGER"
        )
    return text
