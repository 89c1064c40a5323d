"""Argument checks of the public strategies, run when a strategy is built (before anything
is drawn): a bad option raises ``InvalidArgument`` naming ``name=value`` and the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hypothesis.errors import InvalidArgument
from hypothesis.strategies import SearchStrategy


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in dtypes)


def check_dtype(name: str, value: object, allowed: Sequence[torch.dtype]) -> None:
    if value not in allowed:
        raise InvalidArgument(
            f"{name}={value!r} is not supported; pass one of {dtype_names(allowed)}"
        )


def check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an int (got {type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InvalidArgument(f"{name}={value!r} must be {bound}; pass e.g. {name}={low}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgument(f"{name}={value!r} is not one of {choices}; pass one of them")


def check_bool_or_none(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be True, False, or None (None draws both)")


def check_kinds(
    name: str, kinds: object, allowed: Sequence[str], hint: str = ""
) -> tuple[str, ...]:
    if isinstance(kinds, str) or not isinstance(kinds, Sequence | frozenset | set):
        raise InvalidArgument(
            f"{name}={kinds!r} must be a sequence of kind names, e.g. {name}=({allowed[0]!r},)"
        )
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgument(f"{name}={kinds!r} is empty; pass at least one of {allowed}")
    unknown = [kind for kind in kinds if kind not in allowed]
    if unknown:
        raise InvalidArgument(
            f"{name}={kinds!r} contains unknown kinds {unknown}; choose from {allowed}{hint}"
        )
    return kinds


def check_alpha(alpha: object) -> None:
    if alpha is None or isinstance(alpha, SearchStrategy):
        return
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InvalidArgument(
            f"alpha={alpha!r} must be a finite number, a strategy (st.none() for alpha = rank), "
            f"or None to draw it"
        )
