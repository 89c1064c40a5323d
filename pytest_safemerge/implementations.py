"""Merge implementations under test: loading ``MODULE:OBJECT``, safemerge's own engine, and
one call of an implementation observed (what it returned, raised, and wrote in place).

The tensor-level contract (DESIGN.md, "The plugin's contract")::

    fuse(weight, lora_A, lora_B, scale) -> Tensor | None
    unfuse(weight, lora_A, lora_B, scale) -> Tensor | None    # optional
    exact_unfuse: bool                                        # optional, default False

``weight`` is ``(out, in)``, ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; the call
updates ``weight`` in place (returning None) or returns the new weight, and raises when
the merged weight would not be finite in ``weight.dtype``, leaving ``weight`` unchanged.
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import safemerge

DEFAULT_SPEC = "pytest_safemerge.implementations:SAFEMERGE"


class SafemergeEngine:
    """safemerge's guarded float32 fuse, in the tensor-level contract.

    ``fuse_weight`` keeps the compact correction of every fuse, so ``unfuse`` of the most
    recent fuse of a weight restores its bits exactly; an unfuse with no matching fuse
    subtracts (the arithmetic inverse).
    """

    exact_unfuse = True

    def __init__(self) -> None:
        # id(weight) -> (a weak reference to that weight, its fuses, latest last). The weak
        # reference tells a live weight from a new one that reuses a dead one's id.
        self._fuses: dict[int, tuple[weakref.ref[torch.Tensor], list[safemerge.FuseRecord]]] = {}

    def fuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> None:
        record = safemerge.fuse_weight(weight, safemerge.LoraAdapter(lora_A, lora_B), scale=scale)
        self._records_of(weight).append(record)

    def unfuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> None:
        records = self._records_of(weight)
        if records:
            safemerge.unfuse_weight(weight, records[-1])
            records.pop()
            return
        adapter = safemerge.LoraAdapter(lora_A, lora_B)
        safemerge.fuse_weight(weight, adapter, scale=-scale, exact_unfuse=False)

    def _records_of(self, weight: torch.Tensor) -> list[safemerge.FuseRecord]:
        for key in [k for k, (ref, _) in self._fuses.items() if ref() is None]:
            del self._fuses[key]
        entry = self._fuses.get(id(weight))
        if entry is None or entry[0]() is not weight:
            entry = (weakref.ref(weight), [])
            self._fuses[id(weight)] = entry
        return entry[1]


#: The default implementation under test.
SAFEMERGE = SafemergeEngine()


def load_implementation(spec: str | None) -> Implementation:
    """The implementation named ``MODULE:OBJECT`` (safemerge's engine for None).

    Raises:
        pytest.UsageError: the module or object cannot be found, or has no ``fuse``.
    """
    spec = spec or DEFAULT_SPEC
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise pytest.UsageError(
            f"--safemerge-impl={spec}: cannot import module {module_name!r} ({error}); is it "
            f"installed or on sys.path (run pytest from its directory, or pip install -e it)?"
        ) from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise pytest.UsageError(
                f"--safemerge-impl={spec}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(getattr(target, "fuse", None)):
        raise pytest.UsageError(
            f"--safemerge-impl={spec}: {attribute} has no callable fuse(weight, lora_A, "
            f"lora_B, scale); see the contract in pytest_safemerge.implementations"
        )
    return Implementation(spec, target)


@dataclass(frozen=True)
class Call:
    """What one call of ``fuse`` or ``unfuse`` did.

    Attributes:
        error: the Exception it raised, or None.
        returned: what it returned (None for an in-place implementation).
        result: the merged weight: ``returned`` when it is a tensor, else the weight.
        wrote_in_place: whether the weight's bits changed during the call.
    """

    error: Exception | None
    returned: object
    result: torch.Tensor | None
    wrote_in_place: bool

    @property
    def refused(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class Implementation:
    """An implementation under test, called the same way by every property."""

    spec: str
    target: Any

    @property
    def has_unfuse(self) -> bool:
        return callable(getattr(self.target, "unfuse", None))

    @property
    def exact_unfuse(self) -> bool:
        return bool(getattr(self.target, "exact_unfuse", False))

    def fuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> Call:
        return _observe(self.target.fuse, weight, lora_A, lora_B, scale)

    def unfuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> Call:
        return _observe(self.target.unfuse, weight, lora_A, lora_B, scale)


def _observe(
    method: Any, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> Call:
    before = safemerge.numerics.int_view(weight.detach().contiguous()).clone()
    try:
        with torch.no_grad():
            returned = method(weight, lora_A, lora_B, scale)
    except Exception as error:  # the contract: refusing is raising any Exception
        return Call(error, None, None, _changed(before, weight))
    result = returned if isinstance(returned, torch.Tensor) else weight
    return Call(None, returned, result, _changed(before, weight))


def _changed(before: torch.Tensor, weight: torch.Tensor) -> bool:
    after = safemerge.numerics.int_view(weight.detach().contiguous())
    return bool((after != before).any())
