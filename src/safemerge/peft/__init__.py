"""safemerge for PEFT: a guarded, all-or-nothing ``merge_and_unload``, and an exact
``merge``/``unmerge`` that keep the adapters attached.

``safemerge.peft:PEFT_LORA`` (PEFT's own LoRA merge code in the conformance suite's
contracts, ``pytest --safemerge-impl=safemerge.peft:PEFT_LORA``) lives with the plugin, in
:mod:`pytest_safemerge.targets.peft`; the names here are aliases, resolved on first use so
that importing safemerge never imports the plugin.
"""

from __future__ import annotations

from typing import Any

from safemerge.peft.merge import merge, merge_and_unload, unmerge

__all__ = ["PEFT_LORA", "PeftLoraMerge", "merge", "merge_and_unload", "unmerge"]

_SUITE_TARGETS = ("PEFT_LORA", "PeftLoraMerge")


def __getattr__(name: str) -> Any:
    if name in _SUITE_TARGETS:
        from pytest_safemerge.targets import peft

        return getattr(peft, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
