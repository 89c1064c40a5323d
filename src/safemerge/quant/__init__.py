"""bitsandbytes layers: the 4-bit code grids and their bounds (``grid``), reading and
writing packed weights and quantization state (``bnb``), and the guarded
dequantize-merge-requantize fuse with its per-block check (``quantized``). See
``docs/design.md``, "Quantized layers".
"""
