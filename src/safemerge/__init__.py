"""safemerge: guarded, exact and testable merging of LoRA adapters into model weights."""

from safemerge import numerics, synthetic
from safemerge.adapter import LoraAdapter
from safemerge.adapter_formats import AdapterSet, load_adapter, write_peft_adapter
from safemerge.bounds import merge_bound
from safemerge.errors import (
    AdapterConfigError,
    AdapterFormatError,
    CheckpointError,
    NonFiniteMergeError,
    RestoreError,
    SafemergeError,
    UnsupportedLayerError,
)
from safemerge.files import Checkpoint, TensorInfo, open_checkpoint
from safemerge.fuse import fuse, fuse_weight, unfuse, unfuse_weight
from safemerge.layers import matrix_form
from safemerge.quantized import QuantizedFuseRecord, quantization_bound
from safemerge.record import FuseRecord
from safemerge.reference import expected_fuse

__version__ = "0.1.0"

__all__ = [
    "AdapterConfigError",
    "AdapterFormatError",
    "AdapterSet",
    "Checkpoint",
    "CheckpointError",
    "FuseRecord",
    "LoraAdapter",
    "NonFiniteMergeError",
    "QuantizedFuseRecord",
    "RestoreError",
    "SafemergeError",
    "TensorInfo",
    "UnsupportedLayerError",
    "__version__",
    "expected_fuse",
    "fuse",
    "fuse_weight",
    "load_adapter",
    "matrix_form",
    "merge_bound",
    "numerics",
    "open_checkpoint",
    "quantization_bound",
    "synthetic",
    "unfuse",
    "unfuse_weight",
    "write_peft_adapter",
]
