"""The tuner contract's properties, one check per property on one :class:`TunerCase`.

There is no independent oracle of what a tuner's merged weight should be (LoHa's
Hadamard product, OFT's rotation, FourierFT's spectrum are each the tuner's own
arithmetic): the property is that merging does not change what the layer computes.

**The effective map.** Every tuner here leaves its layer affine in its input (a lookup
for an embedding) in eval mode. The layer's map is read by probing a float64 copy of it
(adapter and base cast to float64: the exact function of the stored values) with the
standard basis: ``f(e_k) - f(0)`` is column ``k`` of its effective weight and ``f(0)``
its effective bias (an embedding's rows are looked up directly). Comparing two maps on
the basis compares them on every input: ``|f(x) - g(x)| <= |x| . |W_f - W_g|`` row by
row. The merged layer is probed the same way, so no knowledge of where a tuner keeps its
weight (transposed, a kernel, a table) is needed.

**The bound.** Let ``u`` be the unit roundoff of the weight's dtype (``2^-24``,
``2^-11``, ``2^-8`` for float32, float16, bfloat16), ``W0`` the weight before the merge,
``W`` the unmerged layer's effective weight and ``M`` the merged one. PEFT keeps the
adapter in float32 (upcast beside a half weight) and computes the delta (or rotation)
from it in float32, then rounds the result once to the weight's dtype. Each entry of the
delta is a chain of at most ``m = fan_in + fan_out`` float32 operations (a product of
rank at most the layer's width, a rotation of a block at most that wide), each off by at
most ``2^-24`` of a magnitude no larger than the layer's (``s = max|W| + max|W0|``;
random adapter values at moderate scales do not cancel beyond that). So::

    |M - W| <= u |W| + c,          c = m 2^-24 s                       (accuracy)

and for the round trip (merge then unmerge, ``R`` the restored weight): the merged
weight's rounding ``u |M|``, carried back by the inverse (a rotation spreads one entry's
error over at most ``m`` entries: ``sqrt(m)`` in the worst row), the restored weight's
own rounding, and both computations::

    |R - W0| <= sqrt(m) u max|M| + 2 u |W0| + 2 c                      (round trip)

A bias (BEFT, LoRA-like bias options) is held to the same bounds with its own values.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_safemerge.peft_suite.tuner_cases import (
    IN_FEATURES,
    OUT_FEATURES,
    TunerCase,
)
from pytest_safemerge.results import Row

#: What a safe merge raises to refuse (PEFT: ``ValueError: NaNs detected ...``).
REFUSALS: tuple[type[BaseException], ...] = (ValueError,)
PLANTED = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
_MIXING = IN_FEATURES + OUT_FEATURES
_FLOAT32_ROUNDOFF = 2.0**-24


class TunerLacks(Exception):
    """The installed tuner lacks what a property needs (a safe merge, an unmerge)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


@dataclass(frozen=True)
class AffineMap:
    """A layer's effective weight (out x fan-in; an embedding's table) and bias, float64."""

    weight: torch.Tensor
    bias: torch.Tensor


def effective_map(layer: nn.Module, kind: str) -> AffineMap:
    """What ``layer`` computes, read from a float64 copy on the standard basis."""
    try:
        probe = copy.deepcopy(layer)
    except RuntimeError:
        # A tuner that keeps a computed tensor as an attribute (DEFT) cannot be deep-copied:
        # probe the layer itself in float64, then give each tensor back its dtype (exact:
        # float64 holds every value of the narrower dtypes).
        with _in_float64(layer):
            return _probe(layer, kind)
    return _probe(probe.to(torch.float64).eval(), kind)


@contextlib.contextmanager
def _in_float64(layer: nn.Module) -> Iterator[None]:
    tensors = [*layer.parameters(), *layer.buffers()]
    dtypes = [tensor.dtype for tensor in tensors]
    layer.to(torch.float64)
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes, strict=True):
            tensor.data = tensor.data.to(dtype)


def _probe(probe: nn.Module, kind: str) -> AffineMap:
    with torch.no_grad():
        if kind == "embedding":
            table = probe(torch.arange(IN_FEATURES)).reshape(IN_FEATURES, OUT_FEATURES)
            return AffineMap(table, torch.zeros(OUT_FEATURES, dtype=torch.float64))
        basis = torch.eye(IN_FEATURES, dtype=torch.float64)
        if kind == "conv1d":
            basis = basis.reshape(IN_FEATURES, IN_FEATURES // 2, 2)
        elif kind == "conv2d":
            basis = basis.reshape(IN_FEATURES, IN_FEATURES // 4, 2, 2)
        bias = probe(torch.zeros_like(basis[:1])).reshape(OUT_FEATURES)
        columns = probe(basis).reshape(IN_FEATURES, OUT_FEATURES) - bias
        return AffineMap(columns.T.contiguous(), bias)


def base_map(layer: Any, kind: str) -> AffineMap:
    """What the base layer alone computes (the weight before any merge)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    return effective_map(base, kind)


def reference_maps(case: TunerCase) -> tuple[AffineMap, AffineMap]:
    """The base layer's map and the unmerged layer's, of a case no check has changed yet:
    read once per pristine case and shared by its fresh copies (:meth:`TunerCase.fresh`)."""
    if "unmerged" not in case.maps:
        base = base_map(case.layer, case.kind)
        case.maps["unmerged"] = effective_map(case.layer, case.kind)  # may raise: set last
        case.maps["base"] = base
    return case.maps["base"], case.maps["unmerged"]


def _fraction(error: torch.Tensor, bound: torch.Tensor) -> float:
    """The worst ``error / bound`` (inf where a bound is 0 and the error is not, or NaN)."""
    if not bool(torch.isfinite(error).all()):
        return math.inf
    ratio = torch.where(bound > 0, error / bound.clamp_min(1e-300), error * math.inf)
    return float(torch.nan_to_num(ratio, nan=0.0).max()) if ratio.numel() else 0.0


def _where(error: torch.Tensor, bound: torch.Tensor) -> str:
    """The worst entry, for the message."""
    index = int((error - bound).argmax())
    return f"worst entry {index}: off by {float(error.reshape(-1)[index]):.3g}, bound {float(bound.reshape(-1)[index]):.3g}"


def _largest(tensor: torch.Tensor) -> float:
    return float(tensor.abs().max()) if tensor.numel() else 0.0


def _compute_error(unmerged: AffineMap, before: AffineMap) -> float:
    parts = (unmerged.weight, before.weight, unmerged.bias, before.bias)
    return _MIXING * _FLOAT32_ROUNDOFF * sum(_largest(part) for part in parts)


def safe_merge(layer: Any) -> None:
    """``layer.merge(safe_merge=True)``; :class:`TunerLacks` if its merge has no guard."""
    if "safe_merge" not in inspect.signature(type(layer).merge).parameters:
        raise TunerLacks(f"{type(layer).__qualname__}.merge has no safe_merge")
    try:
        layer.merge(safe_merge=True)
    except NotImplementedError as error:
        raise TunerLacks(f"{type(layer).__qualname__}.merge is not implemented: {error}") from error


def check_accurate(case: TunerCase, row: Row) -> None:
    """The merged layer computes what the unmerged one did, within the accuracy bound."""
    __tracebackhide__ = True
    before, unmerged = reference_maps(case)
    assert _finite(unmerged), f"[tuner accuracy] the unmerged {case.describe()} is not finite"
    try:
        safe_merge(case.layer)
    except REFUSALS as error:
        raise AssertionError(
            f"[tuner accuracy] merge(safe_merge=True) refused a finite merge: "
            f"{type(error).__name__}: {error} ({case.describe()})"
        ) from error
    merged = effective_map(case.layer, case.kind)
    u = unit_roundoff(case.dtype)
    c = _compute_error(unmerged, before)
    for part in ("weight", "bias"):
        exact, got = getattr(unmerged, part), getattr(merged, part)
        off = (got - exact).abs()
        bound = u * exact.abs() + c
        row.observe(_fraction(off, bound))
        assert bool((off <= bound).all()), (
            f"[tuner accuracy] the merged layer's {part} is not what the unmerged layer "
            f"computes, within u|W| + m 2^-24 s: {_where(off, bound)} ({case.describe()})"
        )


def check_round_trip(case: TunerCase, row: Row) -> None:
    """merge then unmerge restores the weight and bias within the round-trip bound."""
    __tracebackhide__ = True
    if getattr(type(case.layer), "unmerge", None) is _base_unmerge():
        raise TunerLacks(f"{type(case.layer).__qualname__} has no unmerge")
    before, unmerged = reference_maps(case)
    safe_merge(case.layer)
    merged = base_map(case.layer, case.kind)
    case.layer.unmerge()
    restored = base_map(case.layer, case.kind)
    u = unit_roundoff(case.dtype)
    c = _compute_error(unmerged, before)
    for part in ("weight", "bias"):
        original, got = getattr(before, part), getattr(restored, part)
        spread = math.sqrt(_MIXING) * u * _largest(getattr(merged, part))
        bound = spread + 2 * u * original.abs() + 2 * c
        error = (got - original).abs()
        row.observe(_fraction(error, bound))
        assert bool((error <= bound).all()), (
            f"[tuner round trip] after merge and unmerge the {part} is not the original "
            f"within its bound: {_where(error, bound)} ({case.describe()})"
        )


def check_merge_twice(case: TunerCase, row: Row) -> None:
    """A second merge is a no-op or refused: the layer holds the bytes of the first."""
    __tracebackhide__ = True
    safe_merge(case.layer)
    once = snapshot(case.layer)
    with contextlib.suppress(Exception):  # refusing the second merge is allowed
        safe_merge(case.layer)
    changed = _changed(once, snapshot(case.layer))
    row.observe(1.0 if changed else 0.0)
    assert not changed, (
        f"[tuner merge twice] a second merge changed {', '.join(changed)}: the delta was "
        f"applied twice ({case.describe()})"
    )


@dataclass(frozen=True)
class Plant:
    """A non-finite value at one position of one adapter parameter."""

    parameter: str
    position: int
    value: str

    def apply(self, case: TunerCase) -> None:
        target = case.trainable()[self.parameter]
        with torch.no_grad():
            target.view(-1)[self.position] = PLANTED[self.value]

    def __str__(self) -> str:
        return f"{self.value} at entry {self.position} of {self.parameter}"


def plants(case: TunerCase) -> list[Plant]:
    """One plant per trainable parameter of the adapter; the value and the position
    follow the case's seed (every value over the parameters, and over the seeds)."""
    generator = torch.Generator().manual_seed(case.seed)
    values = list(PLANTED)
    found = []
    parameters = sorted((n, p) for n, p in case.trainable().items() if p.numel())
    for index, (name, parameter) in enumerate(parameters):
        position = int(torch.randint(parameter.numel(), (), generator=generator))
        found.append(Plant(name, position, values[(index + case.seed) % len(values)]))
    return found


def each_plant(case: TunerCase, row: Row, check: Callable[[TunerCase, Plant], None]) -> None:
    """Run ``check`` on a fresh copy of the case for each plant, recording what was planted."""
    __tracebackhide__ = True
    tags = row.data.setdefault("planted", {})
    for plant in plants(case):
        tags[plant.parameter] = tags.get(plant.parameter, 0) + 1
        tags[plant.value] = tags.get(plant.value, 0) + 1
        planted = case.copy()
        plant.apply(planted)
        check(planted, plant)


def check_refused(case: TunerCase, row: Row) -> None:
    """NaN or Inf in any adapter parameter, reaching what the unmerged layer computes:
    merge(safe_merge=True) raises ValueError. A value the layer never reads (a vector of
    VB-LoRA's bank no row selects, PVeRA's variance half in eval) need not be refused, but
    the merge it is let through must still write a finite weight."""
    __tracebackhide__ = True

    def refused(planted: TunerCase, plant: Plant) -> None:
        try:
            safe_merge(planted.layer)
        except REFUSALS:
            row.observe(0.0)
            return
        except TunerLacks:
            raise
        except Exception as error:
            row.observe(math.inf)
            raise AssertionError(
                f"[tuner refusal] refused by crashing on {plant}: {type(error).__name__}: "
                f"{error} ({planted.describe()})"
            ) from error
        finite = _finite(base_map(planted.layer, planted.kind))
        if finite and not _reaches(case, plant):
            row.observe(0.0)
            tags = row.data["planted"]
            tags["unread"] = tags.get("unread", 0) + 1
            return
        row.observe(math.inf)
        raise AssertionError(
            f"[tuner refusal] merge(safe_merge=True) did not refuse {plant}: the merged "
            f"weight is {'finite (the merge dropped what the layer computes with it)' if finite else 'not finite'} "
            f"({planted.describe()})"
        )

    each_plant(case, row, refused)


def _reaches(case: TunerCase, plant: Plant) -> bool:
    """Whether ``plant`` makes what the unmerged layer computes non-finite."""
    planted = case.copy()
    plant.apply(planted)
    return not _finite(effective_map(planted.layer, planted.kind))


def check_atomic(case: TunerCase, row: Row) -> None:
    """After a refused (or crashed) merge, the base layer's weight, bias and buffers, and
    the tuner layer's buffers, hold the bytes they held."""
    __tracebackhide__ = True

    def unchanged(planted: TunerCase, plant: Plant) -> None:
        before = snapshot(planted.layer)
        try:
            safe_merge(planted.layer)
        except TunerLacks:
            raise
        except Exception:
            changed = _changed(before, snapshot(planted.layer))
            row.observe(1.0 if changed else 0.0)
            assert not changed, (
                f"[tuner atomicity] the refused merge of {plant} changed "
                f"{', '.join(changed)} ({planted.describe()})"
            )
            merged = list(getattr(planted.layer, "merged_adapters", []))
            assert not merged, (
                f"[tuner atomicity] the refused merge of {plant} left merged_adapters = "
                f"{merged} ({planted.describe()})"
            )

    each_plant(case, row, unchanged)


def snapshot(layer: Any) -> dict[str, torch.Tensor]:
    """The base layer's parameters and buffers, and the tuner layer's buffers, copied."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer
    state = {f"base_layer.{name}": value for name, value in base.state_dict().items()}
    state.update({name: value for name, value in layer.named_buffers() if name not in state})
    return {name: value.detach().clone() for name, value in state.items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Tensors whose bytes, dtype or shape differ (NaN compares by its bits)."""
    changed = sorted(set(before) ^ set(after))
    for name in sorted(set(before) & set(after)):
        old, new = before[name], after[name]
        same = old.dtype == new.dtype and old.shape == new.shape
        if same and old.numel():
            same = torch.equal(_bytes(old), _bytes(new))
        if not same:
            changed.append(name)
    return changed


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _finite(mapping: AffineMap) -> bool:
    return bool(torch.isfinite(mapping.weight).all() and torch.isfinite(mapping.bias).all())


def _base_unmerge() -> object:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer.unmerge
