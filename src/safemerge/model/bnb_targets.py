"""Which Linear layers transformers quantizes with bitsandbytes, and the config it writes.

transformers decides from the model class, not from the weights: every ``nn.Linear``
except the output embeddings (``lm_head``), tied weights, the model's last parameter's
module, ``_keep_in_fp32_modules`` and ``llm_int8_skip_modules``. So the model is built
from its ``config.json`` on the meta device (no memory, no weights) and asked, through
transformers' own bitsandbytes quantizer, rather than guessed from tensor names.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safemerge.errors import CheckpointError, ModelFuseError
from safemerge.io.bnb_checkpoint import QuantSpec, quantization_config_fields
from safemerge.io.checkpoint import read_json


def quantization_config(spec: QuantSpec, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, as ``BitsAndBytesConfig.to_dict()``
    writes it."""
    config = _transformers().BitsAndBytesConfig(**quantization_config_fields(spec, compute_dtype))
    fields: dict[str, Any] = config.to_dict()
    return fields


def quantized_linears(model_dir: Path, spec: QuantSpec) -> dict[str, tuple[int, int]]:
    """The modules transformers quantizes when it loads ``model_dir`` with ``spec``:
    module name -> ``(out_features, in_features)``.

    Raises:
        CheckpointError: ``model_dir`` has no ``config.json`` transformers can build.
        ModelFuseError: the model has Conv1D projections (GPT-2), which this export does
            not write.
    """
    transformers = _transformers()
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json: a quantized or QLoRA export needs the model "
            f"directory (config.json beside the weights) to know which layers transformers "
            f"quantizes",
            path=model_dir,
            reason="missing",
        )
    read_json(config_file)  # a truncated config fails with safemerge's message
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        model_class = _model_class(transformers, config)
        with torch.device("meta"):
            model = model_class(config)
    except Exception as error:  # transformers' own errors: unknown model type, bad config
        raise CheckpointError(
            f"transformers cannot build the model of {config_file} ({type(error).__name__}: "
            f"{error}); a quantized export needs a model transformers knows",
            path=config_file,
            reason="corrupt",
        ) from error
    quantizer = transformers.quantizers.AutoHfQuantizer.from_config(
        transformers.BitsAndBytesConfig(**quantization_config_fields(spec, torch.float32)),
        pre_quantized=True,
    )
    skipped = quantizer.get_modules_to_not_convert(
        model,
        quantizer.quantization_config.llm_int8_skip_modules,
        getattr(model, "_keep_in_fp32_modules", None),
    )
    from transformers.quantizers.quantizers_utils import should_convert_module

    linears: dict[str, tuple[int, int]] = {}
    conv1d: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not should_convert_module(name, skipped):
            continue
        if type(module) is nn.Linear:
            linears[name] = (module.out_features, module.in_features)
        elif type(module).__name__ == "Conv1D":
            conv1d.append((name, "a Conv1D projection (weight stored (in, out))"))
    if conv1d:
        raise ModelFuseError(
            f"{model_dir}: transformers quantizes {len(conv1d)} Conv1D projection(s) (GPT-2 "
            f"style), which safemerge's quantized export does not write yet; export 16-bit",
            problems=conv1d,
            path=model_dir,
        )
    return linears


def _model_class(transformers: Any, config: Any) -> Any:
    """The config's own architecture when transformers has it, else the base model class."""
    for architecture in getattr(config, "architectures", None) or ():
        model_class = getattr(transformers, architecture, None)
        if model_class is not None:
            return model_class
    return transformers.MODEL_MAPPING[type(config)]


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")  # optional: imported when used
    except ImportError as error:
        raise ModelFuseError(
            "a quantized or QLoRA export needs transformers (pip install transformers) to "
            "know which layers it quantizes",
            problems=[],
        ) from error
