"""The properties of the module-level contract, one function each.

Each check takes the implementation, one :class:`LayerChecked` case and the summary row
to fill; it raises AssertionError naming the property (``[layer accuracy] ...``) and
saying how badly it broke.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from hypothesis import target
from hypothesis.control import currently_in_test_context

import safemerge
from pytest_safemerge import assertions
from pytest_safemerge.implementations import (
    Implementation,
    LayerCall,
    changed_tensors,
    describe_error,
    layer_snapshot,
    layer_tensors,
)
from pytest_safemerge.layer_bounds import (
    Expected,
    LayerExpectation,
    expected_layer_fuse,
    expected_layer_round_trip,
)
from pytest_safemerge.layer_strategies import LayerCase
from pytest_safemerge.results import Row
from pytest_safemerge.suite.checks import refused_or_crashed, worst_fraction


class LayerChecked:
    """One case handed to the implementation: a fresh copy of the layer and of the adapters
    on the device under test, and what the layer held before the call."""

    def __init__(self, case: LayerCase, device: str) -> None:
        self.case = case
        self.layer = case.fresh_layer(device)
        self.adapters = case.fresh_adapters(device)
        self.scale = case.scale
        self.before = layer_snapshot(self.layer)
        self.form_before = layer_form(self.layer)
        self._expected: LayerExpectation | None = None
        self._round_trip: LayerExpectation | None = None

    @property
    def expected(self) -> LayerExpectation:
        """What the fuse must leave (computed once, from the pristine layer and adapters)."""
        if self._expected is None:
            case = self.case
            self._expected = expected_layer_fuse(case.layer, case.adapters, case.scale)
        return self._expected

    @property
    def expected_round_trip(self) -> LayerExpectation:
        if self._round_trip is None:
            case = self.case
            self._round_trip = expected_layer_round_trip(case.layer, case.adapters, case.scale)
        return self._round_trip

    @property
    def label(self) -> str:
        count = len(self.adapters)
        return (
            f"{self.case.layer_tag} layer, {count} adapter{'s' if count > 1 else ''}"
            f"{', ' + ', '.join(self.case.options) if self.case.options else ''}, "
            f"scale {self.scale!r}"
        )

    def fuse(self, implementation: Implementation) -> LayerCall:
        return implementation.fuse_layer(self.layer, self.adapters, self.scale)

    def unfuse(self, implementation: Implementation) -> LayerCall:
        return implementation.unfuse_layer(self.layer, self.adapters, self.scale)

    def weight_values(self, prop: str) -> torch.Tensor:
        """The layer's weight as it now holds it (dequantized for a bitsandbytes layer)."""
        __tracebackhide__ = True
        layer: Any = self.layer
        if not self.case.quantized:
            weight: torch.Tensor = layer.weight.detach().cpu()
            return weight
        try:
            shape = (int(layer.out_features), int(layer.in_features))
            values, _ = safemerge.quantization_bound(layer, torch.zeros(shape))
        except Exception as error:
            _fail(
                prop,
                f"the quantized weight of the {self.label} cannot be read any more "
                f"({type(error).__name__}: {error}): was its quantization state replaced?",
            )
        return torch.as_tensor(values).detach().cpu()

    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.layer, "bias", None)
        return None if bias is None else bias.detach().cpu()


def _fail(prop: str, message: str) -> None:
    __tracebackhide__ = True
    raise AssertionError(f"[{prop}] {message}")


def _error(call: LayerCall) -> str:
    return describe_error(call.error)


def _refused(prop: str, checked: LayerChecked, call: LayerCall) -> bool:
    """Whether the call refused; a crash fails (see :func:`checks.refused_or_crashed`)."""
    __tracebackhide__ = True
    case = checked.case
    kind = case.layer_tag
    return refused_or_crashed(
        prop,
        call,
        must_refuse=case.must_refuse,
        what=f"{case.kind} case, {checked.label}" + (f": {case.detail}" if case.detail else ""),
        unsupported=f"{kind} layers" + ("" if case.quantized else f" in {_dtype_of(checked)}"),
        declare="layer_kinds = {'linear', 'lora-bias'}, dtypes = {torch.float32}",
    )


def _dtype_of(checked: LayerChecked) -> str:
    return str(checked.layer.weight.dtype).removeprefix("torch.")


def layer_form(layer: Any) -> dict[str, object]:
    """What a merge must keep of a layer besides its values: the classes, dtypes, shapes,
    devices of its tensors, and its quantization settings."""
    form: dict[str, object] = {"layer class": type(layer).__qualname__}
    for name, parameter in layer.named_parameters(remove_duplicate=False):
        form[f"{name} class"] = type(parameter).__qualname__
        form[f"{name} requires_grad"] = parameter.requires_grad
    for name, tensor in layer_tensors(layer):
        form[name] = (tuple(tensor.shape), tensor.dtype, tensor.device)
    weight = getattr(layer, "weight", None)
    for attribute in ("quant_type", "blocksize", "compress_statistics", "quant_storage"):
        if hasattr(weight, attribute):
            form[f"weight.{attribute}"] = getattr(weight, attribute)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        for attribute in ("quant_type", "blocksize", "nested", "dtype", "shape"):
            form[f"weight.quant_state.{attribute}"] = getattr(state, attribute, None)
    if weight is not None and hasattr(weight, "has_fp16_weights"):
        form["weight.has_fp16_weights"] = weight.has_fp16_weights
    int8_state = getattr(layer, "state", None)
    if int8_state is not None and hasattr(int8_state, "threshold"):
        form["state.threshold"] = int8_state.threshold
        form["state.has_fp16_weights"] = getattr(int8_state, "has_fp16_weights", None)
    return form


def _form_changes(
    before: dict[str, object], after: dict[str, object], aliases: Collection[str] = ()
) -> list[str]:
    """What differs between two :func:`layer_form` results, less the ``aliases`` (see
    :func:`new_aliases`)."""
    changes = []
    for key in sorted(set(before) | set(after)):
        if key in aliases:
            continue
        old, new = before.get(key, "(absent)"), after.get(key, "(absent)")
        if old != new:
            changes.append(f"{key}: {old} -> {new}")
    return changes


def _same_values(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Same shape, dtype and bits (snapshots: contiguous, on the CPU)."""
    if (old.shape, old.dtype) != (new.shape, new.dtype):
        return False
    return old.numel() == 0 or torch.equal(
        old.reshape(-1).view(torch.uint8), new.reshape(-1).view(torch.uint8)
    )


def new_aliases(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Tensors (names of :func:`layer_snapshot`) that appeared during a call holding exactly
    the bits that another tensor of the layer held before the call (or holds after it).

    PEFT's ``Linear8bitLt.merge`` sets ``state.SCB = weight.SCB``, an alias of the same row
    scales, as bitsandbytes' own forward pass does: the layer's values and quantization
    state are what they were. Whether that other tensor kept its bits is for
    :func:`layer_changes` to say.
    """
    found = set()
    for name, new in after.items():
        if name in before:
            continue
        held = [before[other] for other in before] + [after[o] for o in before if o in after]
        if any(_same_values(old, new) for old in held):
            found.add(name)
    return found


def layer_changes(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> tuple[tuple[str, ...], set[str]]:
    """The tensors whose values changed (bits, shape or dtype), appeared or disappeared
    between two snapshots, and apart from them the :func:`new_aliases`, which are no
    change: the values and the quantization state are compared, not where they are kept."""
    aliases = new_aliases(before, after)
    changed = tuple(name for name in changed_tensors(before, after) if name not in aliases)
    return changed, aliases


def _assert_within(
    prop: str, actual: torch.Tensor, expected: Expected, what: str, row: Row | None
) -> None:
    __tracebackhide__ = True
    if tuple(actual.shape) != tuple(expected.reference.shape):
        _fail(
            prop,
            f"{what} has shape {tuple(actual.shape)}; expected {tuple(expected.reference.shape)}",
        )
    if row is not None:
        fraction = worst_fraction(actual, expected.reference, expected.bound)
        row.observe(fraction)
        if currently_in_test_context():  # steer Hypothesis towards the largest errors
            target(fraction, label=f"{expected.name} error as a fraction of its bound")
    assertions.assert_within_bound(
        actual, expected.reference, expected.bound, what=f"[{prop}] {what}"
    )


def _assert_merged(
    prop: str, checked: LayerChecked, expected: LayerExpectation, row: Row, *, after: str
) -> None:
    """The weight and the bias within their bounds; a bias no lora_bias touches unchanged."""
    __tracebackhide__ = True
    weight = checked.weight_values(prop)
    if not checked.case.quantized and weight.dtype != checked.case.layer.weight.dtype:
        _fail(
            prop,
            f"{after}, the weight of the {checked.label} is {weight.dtype}; it was "
            f"{checked.case.layer.weight.dtype}",
        )
    kind = "dequantized weight" if checked.case.quantized else "weight"
    _assert_within(
        prop, weight, expected.weight, f"{after}, the {kind} of the {checked.label}", row
    )
    bias = checked.bias()
    if bias is None:
        return
    if expected.bias is not None:
        _assert_within(prop, bias, expected.bias, f"{after}, the bias of the {checked.label}", row)
    elif "bias" in checked.before:
        assertions.assert_unchanged(
            checked.before["bias"],
            bias,
            what=f"[{prop}] {after}, the bias of the {checked.label}",
            why="though no adapter has a lora_bias",
        )


def _non_finite_summary(checked: LayerChecked) -> str:
    parts = []
    layer: Any = checked.layer
    tensors = {"weight": layer.weight.detach().cpu()}
    if checked.case.quantized:
        try:
            tensors["weight"] = checked.weight_values("layer refusal")
        except AssertionError:
            tensors.pop("weight")
    bias = checked.bias()
    if bias is not None:
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        values = tensor.float()
        bad = int((~torch.isfinite(values)).sum())
        parts.append(f"{name}: {bad} non-finite of {values.numel()}")
    return "; ".join(parts) or "nothing readable"


# --- the properties -------------------------------------------------------------------------------


def check_layer_accurate(implementation: Implementation, checked: LayerChecked, row: Row) -> None:
    """The weight (dequantized, for a quantized layer) and the bias within their bounds; a
    finite merge is not refused."""
    __tracebackhide__ = True
    call = checked.fuse(implementation)
    expected = checked.expected
    if _refused("layer accuracy", checked, call):
        if expected.fits():
            _fail(
                "layer accuracy",
                f"fuse_layer refused a merge whose result fits its dtypes ({checked.label}; "
                f"largest |exact| weight {float(expected.weight.reference.abs().max()):.6g}): "
                f"{_error(call)}",
            )
        return
    if not expected.fits():
        return  # near a dtype's limit: only refusal is checked
    _assert_merged("layer accuracy", checked, expected, row, after="after fuse_layer")


def check_layer_form(implementation: Implementation, checked: LayerChecked, row: Row) -> None:
    """Classes, dtypes, shapes and devices of every tensor, and the quantization settings,
    kept; fuse_layer returns None."""
    __tracebackhide__ = True
    call = checked.fuse(implementation)
    _refused("layer form", checked, call)
    if call.returned is not None:
        _fail(
            "layer form",
            f"fuse_layer returned a {type(call.returned).__name__}; the contract merges in "
            f"place and returns None",
        )
    aliases = new_aliases(checked.before, layer_snapshot(checked.layer))
    changes = _form_changes(checked.form_before, layer_form(checked.layer), aliases)
    if changes:
        _fail(
            "layer form",
            f"after fuse_layer{' (refused)' if call.refused else ''}, the {checked.label} "
            f"changed form:\n  " + "\n  ".join(changes),
        )


def _adapter_tensors(adapters: list[safemerge.LoraAdapter]) -> list[tuple[str, torch.Tensor]]:
    found = []
    for index, adapter in enumerate(adapters):
        for name in ("lora_A", "lora_B", "lora_bias", "magnitude"):
            tensor = getattr(adapter, name)
            if tensor is not None:
                found.append((f"adapters[{index}].{name}", tensor))
    return found


def check_layer_adapters_unmodified(
    implementation: Implementation, checked: LayerChecked, row: Row
) -> None:
    """Every tensor of every adapter holds the same bits after the call, refused or not."""
    __tracebackhide__ = True
    before = [
        (name, tensor.detach().cpu().clone()) for name, tensor in _adapter_tensors(checked.adapters)
    ]
    _refused("layer adapters unmodified", checked, checked.fuse(implementation))
    after = dict(_adapter_tensors(checked.adapters))
    for name, old in before:
        assertions.assert_unchanged(
            old, after[name].detach().cpu(), what=f"[layer adapters unmodified] {name}"
        )


def check_layer_refused(implementation: Implementation, checked: LayerChecked, row: Row) -> None:
    """The call raised: the weight or the bias would not be finite in its dtype."""
    __tracebackhide__ = True
    call = checked.fuse(implementation)
    if not _refused("layer refusal", checked, call):
        case = checked.case
        _fail(
            "layer refusal",
            f"fuse_layer did not refuse a merge that is not finite ({case.kind}: {case.detail}; "
            f"{checked.label}); the layer now holds {_non_finite_summary(checked)}",
        )


def check_layer_atomic(implementation: Implementation, checked: LayerChecked, row: Row) -> None:
    """After a refusal, every tensor of the layer (quantization state included) holds the
    bytes it held, and its form and settings are kept."""
    __tracebackhide__ = True
    call = checked.fuse(implementation)
    if not call.refused:
        return  # the refusal property reports it
    after = layer_snapshot(checked.layer)
    changed, aliases = layer_changes(checked.before, after)
    changes = _form_changes(checked.form_before, layer_form(checked.layer), aliases)
    if not changed and not changes:
        if call.crashed:  # a crash is no refusal, even one that changed nothing
            _refused("layer atomicity", checked, call)
        return
    details = []
    for name in changed:
        old, new = checked.before.get(name), after.get(name)
        if old is None or new is None or (old.shape, old.dtype) != (new.shape, new.dtype):
            details.append(f"{name}: {_form_of(old)} -> {_form_of(new)}")
        else:
            count = int(
                (old.reshape(-1).view(torch.uint8) != new.reshape(-1).view(torch.uint8)).sum()
            )
            details.append(f"{name}: {count} of {old.numel() * old.element_size()} bytes changed")
    how = "crashed, refusing by crashing" if call.crashed else "refused"
    _fail(
        "layer atomicity",
        f"fuse_layer {how} ({_error(call)}) but changed the {checked.label} "
        f"(committed before checking?):\n  " + "\n  ".join(details + changes),
    )


def _form_of(tensor: torch.Tensor | None) -> str:
    return "(absent)" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"


def check_layer_round_trip(implementation: Implementation, checked: LayerChecked, row: Row) -> None:
    """unfuse_layer(fuse_layer(layer)) restores every byte when ``exact_unfuse`` is claimed,
    otherwise the original values within the bounds of the two merges."""
    __tracebackhide__ = True
    fused = checked.fuse(implementation)
    if _refused("layer round trip", checked, fused) or not checked.expected.fits():
        return  # the accuracy property reports a refused finite merge
    call = checked.unfuse(implementation)
    if call.refused:
        _fail(
            "layer round trip",
            f"unfuse_layer refused to undo a fuse_layer it accepted ({checked.label}): "
            f"{_error(call)}",
        )
    if implementation.exact_unfuse:
        after = layer_snapshot(checked.layer)
        changed, aliases = layer_changes(checked.before, after)
        changes = _form_changes(checked.form_before, layer_form(checked.layer), aliases)
        if changed or changes:
            _fail(
                "layer round trip",
                f"the implementation claims exact_unfuse, but after fuse_layer and "
                f"unfuse_layer the {checked.label} does not hold its original bytes: "
                f"{', '.join(changed + tuple(changes))} changed",
            )
        row.observe(0.0)
        return
    _assert_merged(
        "layer round trip",
        checked,
        checked.expected_round_trip,
        row,
        after="after fuse_layer and unfuse_layer",
    )
