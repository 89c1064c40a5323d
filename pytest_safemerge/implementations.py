"""Merge implementations under test: loading ``MODULE:OBJECT``, safemerge's own engine, and
one call of an implementation observed (what it returned, raised, and wrote in place).

The tensor-level contract (``docs/design.md``, "Tensor contract")::

    fuse(weight, lora_A, lora_B, scale) -> Tensor | None
    unfuse(weight, lora_A, lora_B, scale) -> Tensor | None    # optional
    exact_unfuse: bool                                        # optional, default False

``weight`` is ``(out, in)``, ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; the call
updates ``weight`` in place (returning None) or returns the new weight, and refuses when
the merged weight would not be finite in ``weight.dtype``, leaving ``weight`` unchanged.

Declarations (optional; docs/design.md, "Cells, capabilities and refusals")::

    dtypes: Collection[torch.dtype]             # weight dtypes supported; default all
    refusal_errors: tuple[type[Exception], ...]  # what a refusal raises; default (ValueError,)

A refusal is an exception of ``refusal_errors`` (ValueError and its subclasses by
default: safemerge's, PEFT's and diffusers' refusals all are). Any other exception where a
refusal is due is a crash, and fails the refusal cells ("refused by crashing"); on a case
whose merge is finite it fails the cell as an unsupported dtype or layer unless declared.

The module-level contract (optional; the layer suite runs when ``fuse_layer`` exists)::

    fuse_layer(layer: nn.Module, adapters: list[safemerge.LoraAdapter], scale: float) -> None
    unfuse_layer(layer, adapters, scale) -> None    # optional: undo the latest fuse_layer
    layer_kinds: Collection[str]                    # optional: tags supported; default all
    unsupported: Mapping[str, str]                  # optional: tag -> why it is not supported

``fuse_layer`` merges every adapter into ``layer`` in place: ``weight' = W + scale *
sum_i adapter_i.scale * delta_i`` (delta transposed for an Embedding or a fan_in_fan_out
weight, reshaped for a convolution; DoRA renormalised), ``bias' = bias + scale * sum_i
adapter_i.scale * lora_bias_i``, requantized with the same settings for a bitsandbytes
layer. It raises when the weight or the bias would not be finite in its dtype, leaving
every parameter, buffer and quantization state bit for bit as it was, and never modifies
the adapters. ``layer_kinds`` are tags of
:data:`pytest_safemerge.layer_strategies.ALL_TAGS`.

``unsupported`` says what the implementation lacks and why, for an implementation whose
capabilities depend on what is installed (PEFT_LORA on an older PEFT): each key is a tag,
or ``"LAYER+OPTION"`` for an option on one layer kind only (``"embedding+dora"``), and its
value the reason (``"PEFT 0.10.0 has no lora_bias (added in 0.14.0)"``). An unsupported
tag is left out of ``layer_kinds`` (its default too); the cells of an unsupported layer
kind are skipped with the reason, and no case carries an unsupported option (on that
layer kind, for a ``LAYER+OPTION`` key). A tag both declared and unsupported is an error.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import safemerge
from safemerge import names

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
        # layer -> its fuses, latest last (modules hash by identity).
        self._layer_fuses: weakref.WeakKeyDictionary[
            torch.nn.Module, list[safemerge.FuseRecord | safemerge.QuantizedFuseRecord]
        ] = weakref.WeakKeyDictionary()

    def fuse_layer(
        self, layer: torch.nn.Module, adapters: Sequence[safemerge.LoraAdapter], scale: float
    ) -> None:
        """All the adapters in one guarded, all-or-nothing :func:`safemerge.fuse`."""
        record = safemerge.fuse(layer, list(adapters), scale=scale)
        self._layer_fuses.setdefault(layer, []).append(record)

    def unfuse_layer(
        self, layer: torch.nn.Module, adapters: Sequence[safemerge.LoraAdapter], scale: float
    ) -> None:
        """Undo the latest :meth:`fuse_layer` of ``layer`` exactly; with none recorded,
        subtract the adapters (the arithmetic inverse; not for DoRA)."""
        records = self._layer_fuses.get(layer)
        if records:
            safemerge.unfuse(layer, records[-1])
            records.pop()
            return
        if any(adapter.is_dora for adapter in adapters):
            raise safemerge.RestoreError(
                "no fuse_layer of this layer was recorded, and a DoRA merge has no arithmetic "
                "inverse without the factor it used: unfuse only what fuse_layer fused"
            )
        safemerge.fuse(layer, list(adapters), scale=-scale, exact_unfuse=False)

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


def resolve_spec(flag: str, spec: str) -> Any:
    """The object ``MODULE:OBJECT`` names (``OBJECT`` may be dotted).

    Raises:
        pytest.UsageError: the module cannot be imported, or has no such attribute.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise pytest.UsageError(
            f"{flag}={spec}: cannot import module {module_name!r} ({error}); is it "
            f"installed or on sys.path (run pytest from its directory, or pip install -e it)?"
        ) from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise pytest.UsageError(
                f"{flag}={spec}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return target


def load_implementation(spec: str | None) -> Implementation:
    """The implementation named ``MODULE:OBJECT`` (safemerge's engine for None).

    Raises:
        pytest.UsageError: the module or object cannot be found, or has no ``fuse``.
    """
    spec = spec or DEFAULT_SPEC
    target = resolve_spec("--safemerge-impl", spec)
    attribute = spec.partition(":")[2]
    if not callable(getattr(target, "fuse", None)):
        raise pytest.UsageError(
            f"--safemerge-impl={spec}: {attribute} has no callable fuse(weight, lora_A, "
            f"lora_B, scale); see the contract in pytest_safemerge.implementations"
        )
    implementation = Implementation(spec, target)
    implementation.check_declarations()
    return implementation


class _Outcome:
    """What :class:`Call` and :class:`LayerCall` share: how a call ended."""

    error: Exception | None
    refusal_errors: tuple[type[BaseException], ...]

    @property
    def refused(self) -> bool:
        """It raised (a refusal, or a crash: see :attr:`crashed`)."""
        return self.error is not None

    @property
    def crashed(self) -> bool:
        """It raised something that is not one of the implementation's refusal errors."""
        return self.error is not None and not isinstance(self.error, self.refusal_errors)


@dataclass(frozen=True)
class Call(_Outcome):
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

    refusal_errors: tuple[type[BaseException], ...] = (ValueError,)


def describe_error(error: BaseException | None) -> str:
    """``"TypeError: message"``."""
    return "nothing" if error is None else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Implementation:
    """An implementation under test, called the same way by every property."""

    spec: str
    target: Any

    @property
    def has_unfuse(self) -> bool:
        return callable(getattr(self.target, "unfuse", None))

    @property
    def refusal_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that count as a refusal (``refusal_errors``, default ValueError)."""
        declared = getattr(self.target, "refusal_errors", None)
        return (ValueError,) if declared is None else tuple(declared)

    @property
    def dtypes(self) -> frozenset[str] | None:
        """Names of the weight dtypes the implementation declares (None: undeclared)."""
        declared = getattr(self.target, "dtypes", None)
        if declared is None:
            return None
        return frozenset(str(dtype).removeprefix("torch.") for dtype in declared)

    def check_declarations(self) -> None:
        """Raise pytest.UsageError for a ``dtypes``, ``refusal_errors`` or ``layer_kinds``
        that the suite cannot use, naming the value and the fix."""
        declared = getattr(self.target, "dtypes", None)
        if declared is not None:
            if isinstance(declared, str) or not all(
                isinstance(dtype, torch.dtype) for dtype in declared
            ):
                raise pytest.UsageError(
                    f"--safemerge-impl={self.spec}: dtypes={declared!r} must be a collection of "
                    f"torch dtypes, e.g. dtypes = {{torch.float32, torch.bfloat16}}"
                )
            unknown = sorted((self.dtypes or frozenset()) - set(names.WEIGHT_DTYPES))
            if unknown or not self.dtypes:
                raise pytest.UsageError(
                    f"--safemerge-impl={self.spec}: dtypes={sorted(self.dtypes or ())!r} "
                    + (
                        f"names dtypes the suite has no cases for: {unknown}"
                        if unknown
                        else "is empty"
                    )
                    + f"; weight dtypes: {names.listed(names.WEIGHT_DTYPES)}"
                )
        errors = getattr(self.target, "refusal_errors", None)
        if errors is not None and (
            isinstance(errors, type)
            or not all(isinstance(e, type) and issubclass(e, BaseException) for e in errors)
            or not tuple(errors)
        ):
            raise pytest.UsageError(
                f"--safemerge-impl={self.spec}: refusal_errors={errors!r} must be a non-empty "
                f"tuple of exception classes, e.g. refusal_errors = (ValueError,)"
            )
        self.check_layer_kinds()

    def dtype_skip_reason(self, dtype: str, selected: Sequence[str] | None) -> str | None:
        """Why the cells of weight dtype ``dtype`` do not run, or None when they do."""
        if selected is not None and dtype not in selected:
            return f"{dtype} not selected (--safemerge-dtypes={','.join(selected)})"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"{self.spec} does not declare {dtype} (dtypes = {sorted(self.dtypes)})"
        return None

    @property
    def exact_unfuse(self) -> bool:
        return bool(getattr(self.target, "exact_unfuse", False))

    def fuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> Call:
        return _observe(self.target.fuse, weight, lora_A, lora_B, scale, self.refusal_errors)

    def unfuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> Call:
        return _observe(self.target.unfuse, weight, lora_A, lora_B, scale, self.refusal_errors)

    # --- the module-level contract ---------------------------------------------------------

    @property
    def has_fuse_layer(self) -> bool:
        return callable(getattr(self.target, "fuse_layer", None))

    @property
    def has_unfuse_layer(self) -> bool:
        return callable(getattr(self.target, "unfuse_layer", None))

    @property
    def layer_kinds(self) -> frozenset[str]:
        """The case tags the implementation supports: those it declares (every tag unless it
        says otherwise), less those it declares ``unsupported``."""
        from pytest_safemerge.layer_strategies import ALL_TAGS

        kinds = getattr(self.target, "layer_kinds", None)
        declared = ALL_TAGS if kinds is None else frozenset(_canonical(kind) for kind in kinds)
        return declared - self.unsupported.keys()

    @property
    def unsupported(self) -> dict[str, str]:
        """What the implementation declares it lacks (a tag, or ``LAYER+OPTION``), with why."""
        declared = getattr(self.target, "unsupported", None)
        if not declared:
            return {}
        return {_canonical(key): str(reason) for key, reason in declared.items()}

    def layer_skip_reason(self, layer: str) -> str | None:
        """Why the cells of layer kind ``layer`` do not run (the implementation's own reason,
        for an ``unsupported`` one), or None when they do, as far as the layer kind goes."""
        if layer in self.unsupported:
            return f"{self.spec}: {self.unsupported[layer]}"
        if layer not in self.layer_kinds:
            return (
                f"{self.spec} does not declare {layer} (layer_kinds = {sorted(self.layer_kinds)})"
            )
        return None

    def tags_for(self, layer: str) -> frozenset[str]:
        """The tags a case on layer kind ``layer`` may carry: :attr:`layer_kinds`, less the
        options declared unsupported on that layer kind (``LAYER+OPTION``)."""
        prefix = f"{layer}+"
        lacking = {key.removeprefix(prefix) for key in self.unsupported if key.startswith(prefix)}
        return self.layer_kinds - lacking

    def check_unsupported(self) -> None:
        """Raise pytest.UsageError for an ``unsupported`` that is not a mapping from known
        tags (or ``LAYER+OPTION``) to reasons, or that names a tag ``layer_kinds`` declares
        (called by :meth:`check_layer_kinds`, once ``layer_kinds`` is known to be tags)."""
        from pytest_safemerge.layer_strategies import ALL_TAGS, LAYER_TAGS, OPTION_TAGS

        declared = getattr(self.target, "unsupported", None)
        if declared is None:
            return
        example = "e.g. unsupported = {'conv3d': 'no Conv3d layers before release 2.0'}"
        if not isinstance(declared, Mapping) or not all(
            isinstance(key, str) and isinstance(reason, str) and reason.strip()
            for key, reason in declared.items()
        ):
            raise pytest.UsageError(
                f"--safemerge-impl={self.spec}: unsupported={declared!r} must be a mapping "
                f"from tag to the reason it is not supported (a non-empty str), {example}"
            )

        def known(key: str) -> bool:
            layer, plus, option = _canonical(key).partition("+")
            if plus:
                return layer in LAYER_TAGS and option in OPTION_TAGS
            return layer in ALL_TAGS

        unknown = sorted(key for key in declared if not known(key))
        if unknown:
            raise pytest.UsageError(
                f"--safemerge-impl={self.spec}: unsupported names unknown tags {unknown}; keys "
                f"are tags (layer kinds: {names.listed(LAYER_TAGS)}; options: "
                f"{names.listed(OPTION_TAGS)}) or LAYER+OPTION (e.g. 'embedding+dora')"
            )
        kinds = getattr(self.target, "layer_kinds", None) or ()
        both = sorted({_canonical(kind) for kind in kinds} & set(self.unsupported))
        if both:
            raise pytest.UsageError(
                f"--safemerge-impl={self.spec}: {both} both declared in layer_kinds and "
                f"unsupported; leave them out of layer_kinds"
            )

    def check_layer_kinds(self) -> None:
        """Raise pytest.UsageError for a ``layer_kinds`` that names unknown tags or no layer,
        or an ``unsupported`` that :meth:`check_unsupported` refuses."""
        from pytest_safemerge.layer_strategies import ALL_TAGS, LAYER_TAGS

        if not self.has_fuse_layer:
            return
        kinds = getattr(self.target, "layer_kinds", None)
        if kinds is None:
            self.check_unsupported()
            return
        if isinstance(kinds, str) or not all(isinstance(kind, str) for kind in kinds):
            raise pytest.UsageError(
                f"--safemerge-impl={self.spec}: layer_kinds={kinds!r} must be a collection of "
                f"tags, e.g. layer_kinds = {{'linear', 'lora-bias'}}"
            )
        unknown = sorted(set(kinds) - ALL_TAGS - set(names.TAG_ALIASES))
        if unknown or not self.layer_kinds & set(LAYER_TAGS):
            raise pytest.UsageError(
                f"--safemerge-impl={self.spec}: layer_kinds={sorted(kinds)!r} "
                + (f"has unknown tags {unknown}" if unknown else "names no layer kind")
                + f"; layer kinds: {names.listed(LAYER_TAGS)}; options: {names.listed(names.OPTION_TAGS)}"
            )
        self.check_unsupported()

    def fuse_layer(
        self, layer: torch.nn.Module, adapters: Sequence[safemerge.LoraAdapter], scale: float
    ) -> LayerCall:
        return _observe_layer(self.target.fuse_layer, layer, adapters, scale, self.refusal_errors)

    def unfuse_layer(
        self, layer: torch.nn.Module, adapters: Sequence[safemerge.LoraAdapter], scale: float
    ) -> LayerCall:
        return _observe_layer(self.target.unfuse_layer, layer, adapters, scale, self.refusal_errors)


def _canonical(tag: str) -> str:
    """``tag`` (or the layer kind of ``LAYER+OPTION``) under its current spelling."""
    layer, plus, option = tag.partition("+")
    return names.TAG_ALIASES.get(layer, layer) + plus + option


def _observe(
    method: Any,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    refusal_errors: tuple[type[BaseException], ...],
) -> Call:
    before = safemerge.numerics.int_view(weight.detach().contiguous()).clone()
    try:
        with torch.no_grad():
            returned = method(weight, lora_A, lora_B, scale)
    except Exception as error:  # a refusal or a crash: the checks tell them apart
        return Call(error, None, None, _changed(before, weight), refusal_errors)
    result = returned if isinstance(returned, torch.Tensor) else weight
    return Call(None, returned, result, _changed(before, weight), refusal_errors)


def _changed(before: torch.Tensor, weight: torch.Tensor) -> bool:
    after = safemerge.numerics.int_view(weight.detach().contiguous())
    return bool((after != before).any())


@dataclass(frozen=True)
class LayerCall(_Outcome):
    """What one call of ``fuse_layer`` or ``unfuse_layer`` did.

    Attributes:
        error: the Exception it raised, or None.
        returned: what it returned (the contract says None).
        changed: the names (as :func:`layer_tensors` gives them) of the layer's tensors
            whose bits, shape or dtype changed during the call, and of those that
            appeared or disappeared.
    """

    error: Exception | None
    returned: object
    changed: tuple[str, ...]
    refusal_errors: tuple[type[BaseException], ...] = (ValueError,)


def _observe_layer(
    method: Any,
    layer: torch.nn.Module,
    adapters: Sequence[safemerge.LoraAdapter],
    scale: float,
    refusal_errors: tuple[type[BaseException], ...],
) -> LayerCall:
    before = layer_snapshot(layer)
    try:
        with torch.no_grad():
            returned = method(layer, adapters, scale)
    except Exception as error:  # a refusal or a crash: the checks tell them apart
        changed = changed_tensors(before, layer_snapshot(layer))
        return LayerCall(error, None, changed, refusal_errors)
    return LayerCall(None, returned, changed_tensors(before, layer_snapshot(layer)), refusal_errors)


def layer_tensors(layer: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a layer holds, by name: parameters, buffers, a bitsandbytes weight's
    quantization state (a nested absmax's own state too) and int8 row data and scales,
    wherever bitsandbytes keeps them (on the weight, or in the layer's ``state`` after a
    forward pass)."""
    found: list[tuple[str, torch.Tensor]] = []
    for name, parameter in layer.named_parameters(remove_duplicate=False):
        found.append((name, parameter))
    for name, buffer in layer.named_buffers(remove_duplicate=False):
        found.append((name, buffer))
    weight = getattr(layer, "weight", None)
    found.extend(_state_tensors("weight.quant_state", getattr(weight, "quant_state", None)))
    for owner_name, owner in (("weight", weight), ("state", getattr(layer, "state", None))):
        for attribute in ("CB", "SCB"):
            value = getattr(owner, attribute, None)
            if isinstance(value, torch.Tensor):
                found.append((f"{owner_name}.{attribute}", value))
    return found


def _state_tensors(prefix: str, state: Any) -> list[tuple[str, torch.Tensor]]:
    if state is None:
        return []
    found = []
    for key, value in sorted(vars(state).items()):
        if isinstance(value, torch.Tensor):
            found.append((f"{prefix}.{key}", value))
        elif type(value).__name__ == "QuantState":  # a nested absmax's state
            found.extend(_state_tensors(f"{prefix}.{key}", value))
    return found


def layer_snapshot(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every tensor :func:`layer_tensors` names."""
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in layer_tensors(layer)
    }


def changed_tensors(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> tuple[str, ...]:
    """Names whose tensor differs in bits, shape or dtype, or is in only one snapshot."""
    changed = [name for name in before if name not in after]
    changed.extend(name for name in after if name not in before)
    for name, old in before.items():
        new = after.get(name)
        if new is None:
            continue
        if (old.shape, old.dtype) != (new.shape, new.dtype) or not _same_bits(old, new):
            changed.append(name)
    return tuple(changed)


def _same_bits(old: torch.Tensor, new: torch.Tensor) -> bool:
    if old.numel() == 0:
        return True
    return bool(torch.equal(old.reshape(-1).view(torch.uint8), new.reshape(-1).view(torch.uint8)))
