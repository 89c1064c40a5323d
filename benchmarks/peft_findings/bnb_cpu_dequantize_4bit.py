"""Not PEFT's bug, but PEFT's 4-bit merge inherits it: bitsandbytes' CPU dequantize_4bit
reads the wrong absmax when a quantization block straddles two rows.

bitsandbytes 0.50 (backends/cpu/ops.py, dequantize_4bit) runs a row-wise C kernel whenever
the last dimension is even, which assumes every block lies within one row; with
in_features not a multiple of the blocksize, rows after the first block get another
block's scale. peft/tuners/lora/bnb.py Linear4bit.merge dequantizes with it, adds the
delta and requantizes: the wrong values are written back for good (and a float32 sum
beyond float32's range is not even seen). Caught by the suite's module-level accuracy and
refusal properties on every nf4/fp4 case (all of its 4-bit shapes straddle rows).
"""

import sys

import bitsandbytes.functional as F
import torch

weight = torch.zeros(4, 16)
weight[0, 1], weight[2, 0] = 1.0, 3.0  # block 0 = rows 0-1 (absmax 1), block 1 = rows 2-3 (3)
packed, state = F.quantize_4bit(weight, blocksize=32, quant_type="nf4")
values = F.dequantize_4bit(packed, state)
print(
    f"absmax per block: {state.absmax.tolist()}; weight[2, 0] = 3.0 dequantizes to {values[2, 0].item()}"
)
sys.exit(0 if values[2, 0].item() == 3.0 else 1)
