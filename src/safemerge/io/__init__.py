"""Files in and out: checkpoints read lazily and checked on opening (``header``,
``checkpoint``), adapters in PEFT, kohya and diffusers formats (``adapter_keys`` parses
their names, ``base_match`` fits them to a base, ``adapter_formats`` loads and writes
them), and writes that land whole or not at all (``atomic``, ``shard_writer``,
``writer``). The only package that imports ``safetensors``. See ``docs/design.md``,
"Files".
"""
