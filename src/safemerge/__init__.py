"""safemerge: guarded, exact and testable merging of LoRA adapters into model weights."""

from safemerge import numerics, synthetic
from safemerge.adapter import LoraAdapter
from safemerge.adapter_formats import AdapterSet, load_adapter, write_peft_adapter
from safemerge.bounds import merge_bound, merge_bound_parts
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
from safemerge.files import Checkpoint, TensorInfo, open_checkpoint
from safemerge.fuse import fuse, fuse_weight, unfuse, unfuse_weight
from safemerge.layers import matrix_form
from safemerge.model import fuse_files, fuse_model, unfuse_model, weight_shapes
from safemerge.model_report import LayerResult, ModelFuseReport
from safemerge.quantized import QuantizedFuseRecord, quantization_bound
from safemerge.record import FuseRecord
from safemerge.reference import expected_fuse
from safemerge.writer import WrittenModel, write_model

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
