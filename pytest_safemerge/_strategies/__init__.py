"""The builders behind :mod:`pytest_safemerge.strategies` (private: import the public names
from there).

- :mod:`.validation`: the argument checks, run when a strategy is built;
- :mod:`.values`: dtype facts, rounding to a dtype (:func:`.values.representable`),
  seeded tensors, bit patterns, and the planting and overflow helpers the cases share;
- :mod:`.kinds`: the names of the kinds of case;
- :mod:`.tensors`: weights, scales, LoRA adapters;
- :mod:`.adversarial`: adversarial adapters;
- :mod:`.cases`: merge cases (cast and delta overflow included);
- :mod:`.quantization`: bitsandbytes settings.
"""
