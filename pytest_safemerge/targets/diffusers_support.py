"""What the diffusers adapters share: importing diffusers when first used, silencing its
deprecation noise, and remembering which diffusers object merged what until the unfuse."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["import_diffusers", "quiet"]


def import_diffusers(module: str = "diffusers") -> ModuleType:
    """``module`` of diffusers, imported when first used (diffusers is optional).

    Raises:
        ImportError: diffusers is not installed, saying how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"the diffusers targets need diffusers and PEFT ({error}); "
            f"pip install 'safemerge[diffusers]'"
        ) from error


@contextmanager
def quiet() -> Iterator[None]:
    """diffusers warns on every use of its legacy LoRA classes ("deprecated") and PEFT on
    every DoRA replay: noise, not behaviour, and under ``-W error`` it would turn into a
    refusal the merge never made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
