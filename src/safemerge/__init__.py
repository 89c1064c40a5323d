"""safemerge: guarded, exact and testable merging of LoRA adapters into model weights.

The public front. Names load on first use (PEP 562), so ``import safemerge`` and its
torch-free modules (:mod:`safemerge.names`) cost no torch import: the pytest plugin, loaded
on every pytest run, reads its option choices from them. The layout is in
``docs/design.md``, "Layout".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each public name and where it lives: a module's attribute, or a module itself.
_HOMES: dict[str, str] = {
    "AdapterConfigError": "safemerge.errors",
    "AdapterFormatError": "safemerge.errors",
    "AdapterSet": "safemerge.io.adapter_formats",
    "Checkpoint": "safemerge.io.checkpoint",
    "CheckpointError": "safemerge.errors",
    "FuseRecord": "safemerge.merge.record",
    "LayerResult": "safemerge.model.report",
    "LoraAdapter": "safemerge.merge.adapter",
    "ModelFuseError": "safemerge.errors",
    "ModelFuseReport": "safemerge.model.report",
    "ModelWriteError": "safemerge.errors",
    "NonFiniteMergeError": "safemerge.errors",
    "QuantizedFuseRecord": "safemerge.quant.quantized",
    "RestoreError": "safemerge.errors",
    "SafemergeError": "safemerge.errors",
    "TensorInfo": "safemerge.io.header",
    "TensorResult": "safemerge.model.report",
    "UnsupportedLayerError": "safemerge.errors",
    "WrittenModel": "safemerge.io.writer",
    "bounds": "safemerge.merge.bounds",
    "expected_fuse": "safemerge.merge.reference",
    "fuse": "safemerge.layer",
    "fuse_files": "safemerge.model.streaming",
    "fuse_model": "safemerge.model.in_memory",
    "fuse_weight": "safemerge.layer",
    "load_adapter": "safemerge.io.adapter_formats",
    "matrix_form": "safemerge.merge.view",
    "merge_bound": "safemerge.merge.bounds",
    "merge_bound_parts": "safemerge.merge.bounds",
    "numerics": "safemerge.merge.numerics",
    "open_checkpoint": "safemerge.io.checkpoint",
    "quantization_bound": "safemerge.quant.quantized",
    "synthetic": "safemerge.synthetic",
    "unfuse": "safemerge.layer",
    "unfuse_model": "safemerge.model.in_memory",
    "unfuse_weight": "safemerge.layer",
    "weight_shapes": "safemerge.model.in_memory",
    "write_model": "safemerge.io.writer",
    "write_peft_adapter": "safemerge.io.adapter_formats",
}

__all__ = ["__version__", *sorted(_HOMES)]

if TYPE_CHECKING:  # what type checkers and IDEs see; tests/test_layout.py keeps it equal to _HOMES
    from safemerge import synthetic
    from safemerge.errors import (
        AdapterConfigError,
        AdapterFormatError,
        CheckpointError,
        ModelFuseError,
        ModelWriteError,
        NonFiniteMergeError,
        RestoreError,
        SafemergeError,
        UnsupportedLayerError,
    )
    from safemerge.io.adapter_formats import AdapterSet, load_adapter, write_peft_adapter
    from safemerge.io.checkpoint import Checkpoint, open_checkpoint
    from safemerge.io.header import TensorInfo
    from safemerge.io.writer import WrittenModel, write_model
    from safemerge.layer import fuse, fuse_weight, unfuse, unfuse_weight
    from safemerge.merge import bounds, numerics
    from safemerge.merge.adapter import LoraAdapter
    from safemerge.merge.bounds import merge_bound, merge_bound_parts
    from safemerge.merge.record import FuseRecord
    from safemerge.merge.reference import expected_fuse
    from safemerge.merge.view import matrix_form
    from safemerge.model.in_memory import fuse_model, unfuse_model, weight_shapes
    from safemerge.model.report import LayerResult, ModelFuseReport, TensorResult
    from safemerge.model.streaming import fuse_files
    from safemerge.quant.quantized import QuantizedFuseRecord, quantization_bound


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'safemerge' has no attribute {name!r}")
    if home.endswith(f".{name}"):
        value: Any = importlib.import_module(home)
    else:
        value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
