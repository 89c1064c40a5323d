"""safemerge for PEFT: a guarded, all-or-nothing ``merge_and_unload``, and an exact
``merge``/``unmerge`` that keep the adapters attached."""

from safemerge.peft.merge import merge, merge_and_unload, unmerge

__all__ = ["merge", "merge_and_unload", "unmerge"]
