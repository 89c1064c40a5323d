"""safemerge: guarded, exact and testable merging of LoRA adapters into model weights."""

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
from safemerge.model.report import LayerResult, ModelFuseReport
from safemerge.model.streaming import fuse_files
from safemerge.quant.quantized import QuantizedFuseRecord, quantization_bound

__version__ = "0.1.0"

__all__ = [
    "AdapterConfigError",
    "AdapterFormatError",
    "AdapterSet",
    "Checkpoint",
    "CheckpointError",
    "FuseRecord",
    "LayerResult",
    "LoraAdapter",
    "ModelFuseError",
    "ModelFuseReport",
    "ModelWriteError",
    "NonFiniteMergeError",
    "QuantizedFuseRecord",
    "RestoreError",
    "SafemergeError",
    "TensorInfo",
    "UnsupportedLayerError",
    "WrittenModel",
    "__version__",
    "bounds",
    "expected_fuse",
    "fuse",
    "fuse_files",
    "fuse_model",
    "fuse_weight",
    "load_adapter",
    "matrix_form",
    "merge_bound",
    "merge_bound_parts",
    "numerics",
    "open_checkpoint",
    "quantization_bound",
    "synthetic",
    "unfuse",
    "unfuse_model",
    "unfuse_weight",
    "weight_shapes",
    "write_model",
    "write_peft_adapter",
]
