"""safemerge: guarded, exact and testable merging of LoRA adapters into model weights.

The public front. Names load on first use (PEP 562), so ``import safemerge`` and its
torch-free modules (:mod:`safemerge.names`) cost no torch import: the pytest plugin, loaded
on every pytest run, reads its option choices from them. The layout is in
``docs/design.md``, "Layout".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safemerge._version import __version__

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
    "FusedTensors": "safemerge.layer",
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
    "fused_tensors": "safemerge.layer",
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

if TYPE_CHECKING:  # what type checkers see (``X as X``: an explicit re-export); tests/test_layout.py
    # keeps these names equal to _HOMES
    from safemerge import synthetic as synthetic
    from safemerge.errors import AdapterConfigError as AdapterConfigError
    from safemerge.errors import AdapterFormatError as AdapterFormatError
    from safemerge.errors import CheckpointError as CheckpointError
    from safemerge.errors import ModelFuseError as ModelFuseError
    from safemerge.errors import ModelWriteError as ModelWriteError
    from safemerge.errors import NonFiniteMergeError as NonFiniteMergeError
    from safemerge.errors import RestoreError as RestoreError
    from safemerge.errors import SafemergeError as SafemergeError
    from safemerge.errors import UnsupportedLayerError as UnsupportedLayerError
    from safemerge.io.adapter_formats import AdapterSet as AdapterSet
    from safemerge.io.adapter_formats import load_adapter as load_adapter
    from safemerge.io.adapter_formats import write_peft_adapter as write_peft_adapter
    from safemerge.io.checkpoint import Checkpoint as Checkpoint
    from safemerge.io.checkpoint import open_checkpoint as open_checkpoint
    from safemerge.io.header import TensorInfo as TensorInfo
    from safemerge.io.writer import WrittenModel as WrittenModel
    from safemerge.io.writer import write_model as write_model
    from safemerge.layer import FusedTensors as FusedTensors
    from safemerge.layer import fuse as fuse
    from safemerge.layer import fuse_weight as fuse_weight
    from safemerge.layer import fused_tensors as fused_tensors
    from safemerge.layer import unfuse as unfuse
    from safemerge.layer import unfuse_weight as unfuse_weight
    from safemerge.merge import bounds as bounds
    from safemerge.merge import numerics as numerics
    from safemerge.merge.adapter import LoraAdapter as LoraAdapter
    from safemerge.merge.bounds import merge_bound as merge_bound
    from safemerge.merge.bounds import merge_bound_parts as merge_bound_parts
    from safemerge.merge.record import FuseRecord as FuseRecord
    from safemerge.merge.reference import expected_fuse as expected_fuse
    from safemerge.merge.view import matrix_form as matrix_form
    from safemerge.model.in_memory import fuse_model as fuse_model
    from safemerge.model.in_memory import unfuse_model as unfuse_model
    from safemerge.model.in_memory import weight_shapes as weight_shapes
    from safemerge.model.report import LayerResult as LayerResult
    from safemerge.model.report import ModelFuseReport as ModelFuseReport
    from safemerge.model.report import TensorResult as TensorResult
    from safemerge.model.streaming import fuse_files as fuse_files
    from safemerge.quant.quantized import QuantizedFuseRecord as QuantizedFuseRecord
    from safemerge.quant.quantized import quantization_bound as quantization_bound


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
