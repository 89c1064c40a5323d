"""Each property of the PEFT model contract, checked on one generated :class:`ModelCase`.

A check builds the case's PEFT model, calls PEFT's entry points on it as a user would,
and compares what they leave with the oracle (:mod:`.oracle`). Failures raise an
``AssertionError`` whose first line names the property in brackets, the layer, the
case, and the worst error as a multiple of its bound.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from pytest_safemerge.layer_bounds import (
    LayerExpectation,
    expected_layer_fuse,
    expected_layer_round_trip,
)
from pytest_safemerge.peft_suite import features
from pytest_safemerge.peft_suite.configs import AdapterSpec, ModelCase, adapter_tensors, lora_layers
from pytest_safemerge.peft_suite.oracle import (
    Original,
    delta_magnitude,
    forward_bounds,
    layer_expectation,
    module_key,
    original_of,
    plain_tensors,
    scaled_adapter,
    written,
)
from pytest_safemerge.results import Row

__all__ = ["CHECKS", "COMBINED"]

#: The name of the adapter add_weighted_adapter creates.
COMBINED = "combined"
#: The combination types that take a density (kept at 1: nothing pruned or dropped).
_DENSITY_TYPES = ("ties", "dare", "magnitude_prune")


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _within(
    prop: str,
    what: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    bound: torch.Tensor,
    row: Row,
    case: ModelCase,
) -> None:
    """``|actual - reference| <= bound`` everywhere, the worst fraction recorded."""
    error = (actual.detach().to(torch.float64) - reference).abs()
    fraction = torch.where(bound > 0, error / bound, torch.where(error > 0, math.inf, 0.0))
    fraction = torch.where(torch.isnan(error), math.inf, fraction)
    worst = float(fraction.max()) if fraction.numel() else 0.0
    row.observe(worst)
    if not worst <= 1.0:
        where = tuple(int(i) for i in torch.nonzero(fraction == fraction.max())[0])
        raise AssertionError(
            f"[{prop}] {what} is not within its bound: error {float(error[where]):.3g} at "
            f"{where} is {worst:.3g} times its bound {float(bound[where]):.3g} "
            f"(reference {float(reference[where]):.6g}); {case.describe()}"
        )


def _state(peft_model: Any, names: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Every tensor a merge may write, by layer, cloned: of the LoRA layers, or of the
    modules at ``names`` whether PEFT still wraps them or has unloaded them."""
    found = {}
    for name in names or lora_layers(peft_model):
        module = _module_at(peft_model.base_model.model, name)
        weight, bias = (
            written(module) if hasattr(module, "get_base_layer") else plain_tensors(module)
        )
        found[f"{name}.weight"] = weight.detach().clone()
        if bias is not None:
            found[f"{name}.bias"] = bias.detach().clone()
    return found


def _module_at(model: Any, name: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.replace(".base_layer", ""))


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """The tensors whose bits differ (NaN payloads and signed zeros included)."""
    return [key for key in before if key not in after or not _same_bits(before[key], after[key])]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _originals(peft_model: Any) -> dict[str, Original]:
    return {name: original_of(layer) for name, layer in lora_layers(peft_model).items()}


def _call(prop: str, case: ModelCase, what: str, call: Callable[[], Any]) -> Any:
    try:
        with _quiet():
            return call()
    except Exception as error:
        raise AssertionError(
            f"[{prop}] {what} crashed on a finite case: {type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}; {case.describe()}"
        ) from error


def _merge(peft_model: Any) -> None:
    peft_model.base_model.merge_adapter()


def _check_weights(
    prop: str,
    peft_model: Any,
    specs_of: Callable[[str], Sequence[AdapterSpec]],
    originals: dict[str, Original],
    row: Row,
    case: ModelCase,
    *,
    round_trip: bool = False,
    expectations: dict[str, LayerExpectation] | None = None,
) -> None:
    for name, layer in lora_layers(peft_model).items():
        specs = [s for s in specs_of(name) if s.name in adapter_tensors_names(layer)]
        original = originals[name]
        if expectations is not None:
            expectation = expectations[name]
        elif round_trip:
            expectation = expected_layer_round_trip(
                original.module, [scaled_adapter(layer, s, name) for s in specs], 1.0
            )
        else:
            expectation = layer_expectation(layer, name, specs, original)
        weight, bias = written(layer)
        _within(
            prop,
            f"the weight of {name}",
            weight,
            expectation.weight.reference,
            expectation.weight.bound,
            row,
            case,
        )
        if bias is None:
            continue
        if expectation.bias is None:
            if original.bias is None or not torch.equal(bias, original.bias):
                raise AssertionError(
                    f"[{prop}] the bias of {name}, which no lora_bias touches, changed; {case.describe()}"
                )
        else:
            _within(
                prop,
                f"the bias of {name}",
                bias,
                expectation.bias.reference,
                expectation.bias.bound,
                row,
                case,
            )


def adapter_tensors_names(layer: Any) -> set[str]:
    return set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


# --- the properties -----------------------------------------------------------------------------


def check_merge_accurate(case: ModelCase, row: Row) -> None:
    """merge_adapter leaves every weight within its bound of the oracle, and the merged
    forward equals the unmerged one within both forwards' bounds."""
    prop = "merge accuracy"
    peft_model = case.build()
    inputs = case.inputs()
    originals = _originals(peft_model)
    expectations = {
        name: layer_expectation(layer, name, case.adapters, originals[name])
        for name, layer in lora_layers(peft_model).items()
    }
    with torch.no_grad(), _quiet():
        unmerged = peft_model(**inputs)
    _call(prop, case, "merge_adapter", lambda: _merge(peft_model))
    _check_weights(
        prop, peft_model, lambda _: case.adapters, originals, row, case, expectations=expectations
    )
    with torch.no_grad(), _quiet():
        merged = peft_model(**inputs)
    layers = lora_layers(peft_model)
    for index, name in enumerate(("first", "layer")[: len(merged)]):
        bounds = forward_bounds(
            layers[name], name, case.adapters, originals[name], expectations[name], inputs[name]
        )
        _within(
            prop,
            f"the merged forward of {name} (against the unmerged one)",
            merged[index],
            unmerged[index].to(torch.float64),
            bounds.merged + bounds.unmerged,
            row,
            case,
        )


def check_merge_twice(case: ModelCase, row: Row) -> None:
    """A second merge_adapter changes nothing."""
    prop = "merge twice"
    peft_model = case.build()
    _call(prop, case, "merge_adapter", lambda: _merge(peft_model))
    once = _state(peft_model)
    _call(prop, case, "the second merge_adapter", lambda: _merge(peft_model))
    changed = _changed(once, _state(peft_model))
    row.observe(0.0 if not changed else math.inf)
    if changed:
        raise AssertionError(
            f"[{prop}] a second merge_adapter changed {changed}; {case.describe()}"
        )


def check_unmerge_round_trip(case: ModelCase, row: Row) -> None:
    """unmerge_adapter after merge_adapter restores every weight within both merges' bounds."""
    prop = "unmerge round trip"
    peft_model = case.build()
    originals = _originals(peft_model)
    _call(prop, case, "merge_adapter", lambda: _merge(peft_model))
    _call(prop, case, "unmerge_adapter", lambda: peft_model.base_model.unmerge_adapter())
    _check_weights(prop, peft_model, lambda _: case.adapters, originals, row, case, round_trip=True)


def _unloaded_tensors(model: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    found = {}
    for name in names:
        weight, bias = plain_tensors(model.get_submodule(name.replace(".base_layer", "")))
        found[f"{name}.weight"] = weight.detach().clone()
        if bias is not None:
            found[f"{name}.bias"] = bias.detach().clone()
    return found


def check_merge_and_unload(case: ModelCase, row: Row) -> None:
    """merge_and_unload leaves the same bits as merge_adapter."""
    prop = "merge_and_unload"
    peft_model = case.build()
    twin = case.build()
    _call(prop, case, "merge_adapter", lambda: _merge(peft_model))
    merged = _state(peft_model)
    unloaded = _call(prop, case, "merge_and_unload", twin.merge_and_unload)
    names = sorted(lora_layers(peft_model))
    changed = _changed(merged, _unloaded_tensors(unloaded, names))
    row.observe(0.0 if not changed else math.inf)
    if changed:
        raise AssertionError(
            f"[{prop}] merge_and_unload and merge_adapter differ in {changed}; {case.describe()}"
        )


def check_delete_merged(case: ModelCase, row: Row) -> None:
    """Deleting a merged adapter takes its delta out of the weights, or refuses and leaves
    the model as it was."""
    prop = "delete merged"
    peft_model = case.build()
    deleted = case.adapters[0]
    originals = _originals(peft_model)
    held = {
        name: scaled_adapter(layer, deleted, name)
        for name, layer in lora_layers(peft_model).items()
    }
    with _quiet():
        peft_model.base_model.set_adapter(deleted.name)
    _call(prop, case, "merge_adapter", lambda: _merge(peft_model))
    before = _state(peft_model)
    try:
        with _quiet():
            peft_model.delete_adapter(deleted.name)
    except Exception as error:
        changed = _changed(before, _state(peft_model))
        if changed:
            raise AssertionError(
                f"[{prop}] delete_adapter refused ({error}) but changed {changed}; {case.describe()}"
            ) from error
        row.observe(0.0)
        return
    for name, layer in lora_layers(peft_model).items():
        expectation = expected_layer_round_trip(originals[name].module, [held[name]], 1.0)
        weight, _ = written(layer)
        _within(
            prop,
            f"after delete_adapter, the weight of {name}",
            weight,
            expectation.weight.reference,
            expectation.weight.bound,
            row,
            case,
        )


def check_refusal_atomic(case: ModelCase, row: Row) -> None:
    """merge_and_unload(safe_merge=True) with NaN or Inf in one adapter of ``layer``
    refuses and leaves every weight of the model as it was."""
    prop = "refusal atomicity"
    peft_model = case.build()
    poisoned = case.adapters[-1]
    layer = lora_layers(peft_model)["layer"]
    tensors = adapter_tensors(layer, poisoned.name)
    which = case.planted.get("tensor", "A")
    value = case.planted.get("value", math.nan)
    with torch.no_grad():
        target = tensors[which]
        flat = target.view(-1)
        flat[case.planted.get("position", 0) % flat.numel()] = value
    names = sorted(lora_layers(peft_model))
    before = _state(peft_model, names)
    try:
        with _quiet():
            peft_model.merge_and_unload(safe_merge=True)
    except (ValueError, RuntimeError) as error:
        changed = _changed(before, _state(peft_model, names))
        row.observe(0.0 if not changed else math.inf)
        if changed:
            raise AssertionError(
                f"[{prop}] merge_and_unload(safe_merge=True) refused ({' '.join(str(error).split())[:160]}) "
                f"but changed {changed}; {case.describe()}"
            ) from error
        return
    row.observe(math.inf)
    raise AssertionError(
        f"[{prop}] merge_and_unload(safe_merge=True) accepted {value} in {poisoned.name}'s lora_{which} on layer; {case.describe()}"
    )


def _combined_spec(peft_model: Any, name: str) -> AdapterSpec:
    """The config PEFT gave the combined adapter, as the oracle reads it."""
    config = peft_model.peft_config[name]
    options = {
        o
        for o, f in features.OPTIONS.items()
        if o in ("rslora", "lora_bias", "dora") and getattr(config, f, False)
    }
    return AdapterSpec(name, int(config.r), float(config.lora_alpha), frozenset(options))


def _scale(spec: AdapterSpec, name: str) -> float:
    key = module_key(name)
    r = spec.rank(key)
    return spec.alpha_of(key) / (r**0.5 if "rslora" in spec.options else r)


def _check_combined(
    prop: str,
    peft_model: Any,
    pairs: Sequence[tuple[AdapterSpec, float]],
    originals: dict[str, Original],
    row: Row,
    case: ModelCase,
) -> None:
    """The combined adapter's layer equals the weighted adapters' within the float32
    arithmetic that combined their factors: each factor scaled by a float32 product or
    square root (two roundings each side), so ``gamma_6`` of ``|w s| |B| |A|`` per adapter,
    grown by DoRA's ``1 + 2 f``."""
    combined = _combined_spec(peft_model, COMBINED)
    for name, layer in lora_layers(peft_model).items():
        if COMBINED not in adapter_tensors_names(layer):
            continue
        original = originals[name]
        present = [(s, w) for s, w in pairs if s.name in adapter_tensors_names(layer)]
        targets = [
            scaled_adapter(layer, s, name, coefficient=w * _scale(s, name)) for s, w in present
        ]
        made = scaled_adapter(layer, combined, name, coefficient=_scale(combined, name))
        target = expected_layer_fuse(original.module, targets, 1.0)
        result = expected_layer_fuse(original.module, [made], 1.0)
        u = torch.finfo(made.lora_A.dtype).eps / 2
        bound = (
            6
            * u
            / (1 - 6 * u)
            * sum(
                (delta_magnitude(a, original) for a in targets),
                torch.zeros_like(target.weight.bound),
            )
        )
        if any(a.magnitude is not None for a in targets):
            bound = (
                bound
                * 3
                * (
                    target.weight.reference.abs().max() / original.weight.double().abs().max()
                ).clamp_min(1)
            )
        bound = bound + 2.0**-50 * target.weight.reference.abs()
        _within(
            prop,
            f"the combined adapter's weight on {name}",
            result.weight.reference,
            target.weight.reference,
            bound,
            row,
            case,
        )
        target_bias = target.bias.reference if target.bias is not None else original.bias
        result_bias = result.bias.reference if result.bias is not None else original.bias
        if target_bias is not None and result_bias is not None:
            bias_bound = 4 * u * (target_bias.abs() + 1e-30)
            _within(
                prop,
                f"the combined adapter's bias on {name}",
                result_bias,
                target_bias.to(torch.float64),
                bias_bound,
                row,
                case,
            )


def check_weighted_reproduces(case: ModelCase, row: Row) -> None:
    """add_weighted_adapter of one adapter at weight 1 reproduces it, for every
    combination type (PEFT takes a single adapter as linear)."""
    prop = "weighted reproduces"
    combination = case.planted["combination"]
    peft_model = case.build()
    originals = _originals(peft_model)
    chosen = case.adapters[0]
    extra = {"density": 1.0} if combination.startswith(_DENSITY_TYPES) else {}
    _call(
        prop,
        case,
        f"add_weighted_adapter({combination!r})",
        lambda: peft_model.add_weighted_adapter(
            [chosen.name], [1.0], COMBINED, combination_type=combination, **extra
        ),
    )
    _check_combined(prop, peft_model, [(chosen, 1.0)], originals, row, case)


def check_weighted_cat(case: ModelCase, row: Row) -> None:
    """add_weighted_adapter(combination_type="cat") is the adapters' weighted sum: at
    weights 1, the adapters active together; linear in the weights."""
    prop = "weighted cat"
    peft_model = case.build()
    originals = _originals(peft_model)
    weights = case.planted["weights"][: len(case.adapters)]
    pairs = list(zip(case.adapters, weights, strict=True))
    _call(
        prop,
        case,
        "add_weighted_adapter('cat')",
        lambda: peft_model.add_weighted_adapter(
            [a.name for a in case.adapters], list(weights), COMBINED, combination_type="cat"
        ),
    )
    _check_combined(prop, peft_model, pairs, originals, row, case)


CHECKS: dict[str, Callable[[ModelCase, Row], None]] = {
    "merge accuracy": check_merge_accurate,
    "merge twice": check_merge_twice,
    "unmerge round trip": check_unmerge_round_trip,
    "merge_and_unload": check_merge_and_unload,
    "delete merged": check_delete_merged,
    "weighted reproduces": check_weighted_reproduces,
    "weighted cat": check_weighted_cat,
    "refusal atomicity": check_refusal_atomic,
}
