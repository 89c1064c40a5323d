"""The builders behind :mod:`pytest_safemerge.strategies` and
:mod:`pytest_safemerge.layer_strategies` (private: import the public names from there).

- :mod:`.validation`: the argument checks, run when a strategy is built;
- :mod:`.values`: dtype facts, rounding to a dtype (:func:`.values.representable`),
  seeded tensors, bit patterns, and the planting and overflow helpers the cases share;
- :mod:`.kinds`: the names of the kinds of case;
- :mod:`.tensors`: weights, scales, LoRA adapters;
- :mod:`.adversarial`: adversarial adapters;
- :mod:`.cases`: merge cases (cast and delta overflow included);
- :mod:`.quantization`: bitsandbytes settings;
- layers: :mod:`.layer_kinds` (tags, options, kinds of case), :mod:`.layer_case`
  (:class:`LayerCase`), :mod:`.layer_shapes` (layers, 4-bit shapes), :mod:`.layer_adapters`,
  :mod:`.layer_adversarial` (planted non-finite values, overflow pushes),
  :mod:`.layer_cases` (the ``layer_cases`` strategy).
"""
