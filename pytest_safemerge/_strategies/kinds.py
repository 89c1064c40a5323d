"""The names of the kinds of case :func:`pytest_safemerge.strategies.merge_cases` makes."""

from __future__ import annotations

#: Adversarial adapters that need no particular weight (see ``adversarial_adapters``).
ADAPTER_KINDS: tuple[str, ...] = (
    "nan",
    "+inf",
    "-inf",
    "fp16-product-overflow",
    "subnormal",
    "cancellation",
    "non-contiguous",
)
#: Kinds planted in the weight and the adapter together, for a weight dtype narrower than
#: float32 (only ``merge_cases`` makes them): ``"cast-overflow"`` (the float32 sum is
#: beyond the dtype's range: refused) and ``"delta-overflow"`` (the float32 delta alone is
#: beyond it, the sum is well inside: accepted).
WEIGHT_KINDS: tuple[str, ...] = ("cast-overflow", "delta-overflow")
#: Every adversarial kind.
ADVERSARIAL_KINDS: tuple[str, ...] = (*ADAPTER_KINDS, *WEIGHT_KINDS)
#: What ``merge_cases`` can make: ordinary random cases and every adversarial kind.
MERGE_CASE_KINDS: tuple[str, ...] = ("random", *ADVERSARIAL_KINDS)
#: Kinds every correct implementation must refuse (whatever the weight and the scale).
MUST_REFUSE_KINDS: frozenset[str] = frozenset({"nan", "+inf", "-inf", "cast-overflow"})
