"""safemerge for PEFT: a guarded, all-or-nothing ``merge_and_unload``, an exact
``merge``/``unmerge`` that keep the adapters attached, and ``PEFT_LORA``, PEFT's own LoRA
merge code in the conformance suite's contract
(``pytest --safemerge-impl=safemerge.peft:PEFT_LORA``)."""

from safemerge.peft.conformance import PEFT_LORA, PeftLoraMerge
from safemerge.peft.merge import merge, merge_and_unload, unmerge

__all__ = ["PEFT_LORA", "PeftLoraMerge", "merge", "merge_and_unload", "unmerge"]
