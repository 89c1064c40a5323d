"""Third-party merge code in the suite's contracts: give one to ``--safemerge-impl``.

- :mod:`pytest_safemerge.targets.peft`: PEFT's LoRA layers (``PEFT_LORA``; also reachable
  as ``safemerge.peft:PEFT_LORA``).
"""
