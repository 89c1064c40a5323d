"""PEFT's own LoRA merge and unmerge, in the contracts of safemerge's conformance suite.

``pytest --safemerge-impl=safemerge.peft:PEFT_LORA`` runs the suite against the installed
PEFT. Every call goes through PEFT's real code: the layer under test is wrapped in PEFT's
LoRA layer class for its kind (``peft.tuners.lora.layer.Linear``, ``Embedding``,
``Conv1d/2d/3d``, ``peft.tuners.lora.bnb.Linear4bit/Linear8bitLt``), one PEFT adapter per
:class:`~safemerge.LoraAdapter`, its tensors loaded as they are, and PEFT's
``merge(safe_merge=True)`` and ``unmerge()`` do the work. Nothing here corrects PEFT: what
PEFT gets wrong, the suite sees.

Two contracts (``docs/design.md``, "The plugin's contracts"):

- tensor level: ``fuse(weight, lora_A, lora_B, scale)`` returns the merged weight (PEFT's
  safe merge computes into a copy and swaps it in, so the weight passed is not written);
  ``unfuse`` undoes it with ``unmerge()`` on the same PEFT layer, arithmetically
  (``exact_unfuse = False``);
- module level: ``fuse_layer(layer, adapters, scale)`` merges every adapter into ``layer``
  in place (PEFT's LoRA layer holds ``layer`` as its base layer, so PEFT writes it
  directly); ``unfuse_layer`` unmerges them; ``layer_kinds`` says what PEFT handles.

Any PEFT release from 0.10.0 on: what the installed release has is read by
:mod:`pytest_safemerge.targets.peft_features`. What it lacks (``lora_bias`` before 0.14.0,
``Conv3d`` layers before 0.14.0, DoRA on embeddings before 0.13.0, ...) is declared
``unsupported``, each with its reason, so the suite skips those cells saying what the
release lacks; how its layers are built (a ``LoraConfig`` from 0.19.0, one keyword
argument per setting before; ``set_adapter(inference_mode=)`` from 0.18.0) is followed.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pytest_safemerge.targets import peft_features
from pytest_safemerge.targets.identity import ByIdentity
from safemerge.merge.adapter import LoraAdapter
from safemerge.names import ALL_TAGS

__all__ = ["LAYER_KINDS", "PEFT_LORA", "PeftLoraMerge"]

#: The module-level cases PEFT's LoRA layers take, on the latest PEFT (all of the suite's
#: kinds); an older release takes those of them it does not lack (``unsupported``).
LAYER_KINDS = ALL_TAGS


@dataclass
class _Merged:
    """A PEFT LoRA layer that merged adapters into a layer, kept for its ``unmerge``."""

    peft_layer: Any  # a peft.tuners.lora LoraLayer
    adapters: tuple[LoraAdapter, ...]


class PeftLoraMerge:
    """PEFT's LoRA ``merge(safe_merge=True)`` / ``unmerge()`` as an implementation under test.

    Stateful only to find, at unfuse time, the PEFT layer that merged: PEFT unmerges from
    the layer object that merged (a DoRA unmerge needs the weight norm that object cached).
    """

    #: PEFT's unmerge subtracts the delta again: not bit-exact.
    exact_unfuse = False

    @property
    def layer_kinds(self) -> frozenset[str]:
        """The suite's tags the installed PEFT takes: :data:`LAYER_KINDS`, less what it lacks."""
        return LAYER_KINDS - _features().missing().keys()

    @property
    def unsupported(self) -> dict[str, str]:
        """What the installed PEFT lacks (a tag, or ``LAYER+OPTION``), each with the reason:
        ``{"lora-bias": "PEFT 0.10.0 has no lora_bias (added in 0.14.0)", ...}``."""
        return _features().missing()

    def __init__(self) -> None:
        self._weights: ByIdentity[torch.Tensor, tuple[Any, torch.Tensor, torch.Tensor]]
        self._weights = ByIdentity()
        self._layers: ByIdentity[nn.Module, _Merged] = ByIdentity()

    # The tensor contract.

    def fuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``weight + scale * lora_B @ lora_A`` by PEFT's ``Linear.merge(safe_merge=True)``.

        Returns:
            The merged weight: a new tensor (PEFT swaps the copy it merged into in), of
            ``weight``'s dtype and device.

        Raises:
            ValueError: PEFT refused the merge (it found a NaN or Inf in the result).
        """
        peft_layer = _tensor_layer(weight, lora_A, lora_B, scale)
        with _quiet(), torch.no_grad():
            peft_layer.merge(safe_merge=True, adapter_names=[_name(0)])
        merged: torch.Tensor = peft_layer.get_base_layer().weight.detach()
        self._weights.put(merged, (peft_layer, lora_A, lora_B))
        return merged

    def unfuse(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """PEFT's ``unmerge()``: on the PEFT layer whose merge returned ``weight``, or on a
        new one around ``weight``, built in the merged state, for a weight fused elsewhere.

        Returns:
            The unmerged weight (``weight`` itself, which PEFT writes in place).
        """
        known = self._weights.get(weight)
        if known is not None and known[1] is lora_A and known[2] is lora_B:
            peft_layer = known[0]
            self._weights.pop(weight)
        else:
            peft_layer = _tensor_layer(weight, lora_A, lora_B, scale)
            peft_layer.merged_adapters.append(_name(0))
        with _quiet(), torch.no_grad():
            peft_layer.unmerge()
        unmerged: torch.Tensor = peft_layer.get_base_layer().weight.detach()
        return unmerged

    # The module-level contract.

    def fuse_layer(self, layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> None:
        """Merge every adapter into ``layer``, in place, by PEFT's LoRA layer for its kind:
        ``weight + scale * sum(adapter.scale * delta)`` (DoRA renormalised, LoRA bias added).

        Raises:
            ValueError: PEFT refused the merge, or PEFT cannot hold the adapters (e.g. DoRA
                with ``lora_bias``, ``lora_bias`` on an embedding).
            TypeError: ``layer`` is of a kind PEFT has no LoRA layer for, or the adapters
                need what the installed PEFT release lacks (:attr:`unsupported`).
        """
        adapters = tuple(adapters)
        peft_layer = _module_layer(layer, adapters, scale)
        names = [_name(index) for index in range(len(adapters))]
        try:
            with _quiet(), torch.no_grad():
                peft_layer.merge(safe_merge=True, adapter_names=names)
        finally:
            # PEFT commits adapter by adapter: keep whatever it merged, for unfuse_layer.
            if peft_layer.merged_adapters:
                self._layers.put(layer, _Merged(_detached(peft_layer, layer), adapters))

    def unfuse_layer(self, layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> None:
        """PEFT's ``unmerge()`` of the adapters :meth:`fuse_layer` merged into ``layer`` (or,
        for a layer merged elsewhere, of ``adapters`` by a PEFT layer built merged).

        Raises:
            ValueError: a DoRA adapter merged elsewhere: PEFT unmerges DoRA only on the
                layer object that merged it (it divides by the weight norm cached then).
        """
        adapters = tuple(adapters)
        known = self._layers.get(layer)
        if known is not None and _same(known.adapters, adapters):
            peft_layer = _reattached(known.peft_layer, layer)
            self._layers.pop(layer)
        else:
            if any(adapter.is_dora for adapter in adapters):
                raise ValueError(
                    "PEFT unmerges a DoRA adapter only from the LoRA layer that merged it "
                    "(it caches the weight norm at merge time); fuse_layer it here first"
                )
            peft_layer = _module_layer(layer, adapters, scale)
            peft_layer.merged_adapters.extend(_name(index) for index in range(len(adapters)))
        with _quiet(), torch.no_grad():
            peft_layer.unmerge()


#: The implementation under test: ``--safemerge-impl=safemerge.peft:PEFT_LORA``.
PEFT_LORA = PeftLoraMerge()


def _name(index: int) -> str:
    return f"adapter_{index}"


def _same(first: Sequence[LoraAdapter], second: Sequence[LoraAdapter]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))


@contextmanager
def _quiet() -> Iterator[None]:
    """PEFT warns on every quantized merge and on every DoRA replay ("may get different
    generations", "Already following adapters were merged"): noise, not behaviour, and
    under ``-W error`` it would turn into a refusal the merge never made."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _features() -> peft_features.PeftFeatures:
    _peft()  # PEFT's absence said as _peft says it
    return peft_features.installed()


def _lacking(features: peft_features.PeftFeatures, key: str) -> TypeError:
    return TypeError(peft_features.FEATURES[key].missing_in(features.version))


def _peft() -> tuple[Any, Any]:
    """``peft`` and ``peft.tuners.lora.layer``, imported when first used (PEFT is optional)."""
    try:
        peft = importlib.import_module("peft")
        lora = importlib.import_module("peft.tuners.lora.layer")
    except ImportError as error:
        raise ImportError(
            f"safemerge.peft needs PEFT ({error}); pip install 'safemerge[peft]'"
        ) from error
    return peft, lora


def _settings(adapter: LoraAdapter, fan_in_fan_out: bool) -> dict[str, Any]:
    """The adapter's settings, by the names of PEFT's ``LoraConfig`` and of the keyword
    arguments its layers took before 0.19.0 (``lora_bias`` only where PEFT has it)."""
    settings: dict[str, Any] = {
        "r": adapter.rank,
        "lora_alpha": _alpha(adapter),
        "lora_dropout": 0.0,
        "use_rslora": adapter.use_rslora,
        "use_dora": adapter.is_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": False,
    }
    features = _features()
    if adapter.lora_bias is not None and not features.lora_bias:
        raise _lacking(features, "lora-bias")
    if features.lora_bias:
        settings["lora_bias"] = adapter.lora_bias is not None
    return settings


def _config(adapter: LoraAdapter, fan_in_fan_out: bool) -> Any:
    peft, _ = _peft()
    return peft.LoraConfig(**_settings(adapter, fan_in_fan_out), inference_mode=True)


def _keywords(functions: Sequence[Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The ``settings`` that one of ``functions`` (a PEFT layer's ``__init__`` and those it
    passes ``**kwargs`` on to, or its ``update_layer``, before 0.19.0) names. PEFT's
    ``**kwargs`` would swallow the others silently: one that is on (``use_dora=True`` for a
    layer that does not name it) is a TypeError."""
    named = {name for function in functions for name in inspect.signature(function).parameters}
    ignored = sorted(name for name, value in settings.items() if name not in named and value)
    if ignored:
        raise TypeError(
            f"PEFT {_features().version}'s {functions[0].__qualname__} takes no {ignored}: "
            f"it cannot hold this adapter"
        )
    return {name: value for name, value in settings.items() if name in named}


def _initialisers(cls: type) -> list[Any]:
    """``cls.__init__`` and the PEFT ``__init__``s above it (``Conv2d(*args, **kwargs)``
    passes everything on to ``_ConvNd``'s)."""
    return [
        vars(klass)["__init__"]
        for klass in cls.__mro__
        if "__init__" in vars(klass) and klass.__module__.startswith("peft.")
    ]


def _tensor_layer(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> Any:
    """PEFT's ``lora.Linear`` around an ``nn.Linear`` whose weight Parameter wraps ``weight``
    (same storage), the adapter's factors loaded as they are, ``scaling`` set to ``scale``."""
    out_features, in_features = (int(size) for size in weight.shape)
    base = nn.Linear(in_features, out_features, bias=False, device="meta")
    base.weight = nn.Parameter(weight.detach(), requires_grad=False)
    adapter = LoraAdapter(lora_A, lora_B)
    peft_layer = _wrap(base, [adapter], fan_in_fan_out=False, kind="linear")
    # PEFT's scaling is alpha / r: set it to the contract's scale itself, not via alpha.
    peft_layer.scaling[_name(0)] = scale
    return peft_layer


def _module_layer(layer: nn.Module, adapters: Sequence[LoraAdapter], scale: float) -> Any:
    """PEFT's LoRA layer for ``layer``'s kind, holding ``layer`` as its base layer, one
    adapter per :class:`LoraAdapter`, each scaled by PEFT's ``set_scale`` (``lora_scale``)."""
    if not adapters:
        raise ValueError("fuse_layer needs at least one adapter")
    kind, base = _base_of(layer, adapters)
    peft_layer = _wrap(base, adapters, fan_in_fan_out=kind == "fan_in_fan_out", kind=kind)
    for index in range(len(adapters)):
        peft_layer.set_scale(_name(index), scale)
    return peft_layer


def _base_of(layer: nn.Module, adapters: Sequence[LoraAdapter]) -> tuple[str, nn.Module]:
    """The kind of ``layer`` and the module PEFT wraps for it (``layer`` itself, except for a
    transposed weight that is not transformers' ``Conv1D``, given to PEFT as one)."""
    transposed = {adapter.fan_in_fan_out for adapter in adapters}
    if len(transposed) > 1:
        raise ValueError("the adapters disagree on fan_in_fan_out")
    if type(layer).__name__ in ("Linear4bit", "Linear8bitLt") and _is_bnb(layer):
        return ("int8" if type(layer).__name__ == "Linear8bitLt" else "4bit"), layer
    conv1d = _transformers_conv1d()
    if conv1d is not None and isinstance(layer, conv1d):
        return "fan_in_fan_out", layer
    if transposed == {True}:
        return "fan_in_fan_out", _as_conv1d(layer)
    for kind, cls in (
        ("linear", nn.Linear),
        ("embedding", nn.Embedding),
        ("conv1d", nn.Conv1d),
        ("conv2d", nn.Conv2d),
        ("conv3d", nn.Conv3d),
    ):
        if isinstance(layer, cls):
            return kind, layer
    raise TypeError(f"PEFT has no LoRA layer for a {type(layer).__name__}")


def _is_bnb(layer: nn.Module) -> bool:
    return type(layer).__module__.split(".")[0] == "bitsandbytes"


def _transformers_conv1d() -> type[nn.Module] | None:
    try:
        module = importlib.import_module("transformers.pytorch_utils")
    except ImportError:
        return None
    conv1d: type[nn.Module] = module.Conv1D
    return conv1d


def _as_conv1d(layer: nn.Module) -> Any:
    """transformers' ``Conv1D`` sharing ``layer``'s weight and bias Parameters (the same
    objects), so that PEFT, writing their ``.data``, writes ``layer``: PEFT handles a
    transposed weight only as a ``Conv1D``."""
    conv1d = _transformers_conv1d()
    weight = getattr(layer, "weight", None)
    if conv1d is None or not isinstance(weight, nn.Parameter) or weight.ndim != 2:
        raise TypeError(
            f"PEFT takes a transposed (in, out) weight only as transformers' Conv1D; a "
            f"{type(layer).__name__} cannot be given to it as one"
        )
    in_features, out_features = (int(size) for size in weight.shape)
    shell: Any = conv1d(out_features, in_features).to("meta")
    shell.weight = weight
    shell.bias = getattr(layer, "bias", None)
    return shell


def _wrap(
    base: nn.Module, adapters: Sequence[LoraAdapter], *, fan_in_fan_out: bool, kind: str
) -> Any:
    """PEFT's LoRA layer class for ``kind`` around ``base``, with ``adapters`` loaded."""
    _, lora = _peft()
    extra: dict[str, Any] = {}
    if kind in ("4bit", "int8"):
        bnb = importlib.import_module("peft.tuners.lora.bnb")
        cls = bnb.Linear4bit if kind == "4bit" else bnb.Linear8bitLt
    elif kind == "embedding":
        cls = lora.Embedding
    elif kind in ("conv1d", "conv2d", "conv3d"):
        cls = getattr(lora, kind.capitalize(), None)
    else:
        cls = lora.Linear
        extra["is_target_conv_1d_layer"] = fan_in_fan_out
    features = _features()
    lacking = features.missing()
    if cls is None or kind in lacking:
        raise _lacking(features, kind)
    if any(adapter.is_dora for adapter in adapters) and f"{kind}+dora" in lacking:
        raise _lacking(features, f"{kind}+dora")
    first, *others = adapters
    names = [_name(index) for index in range(len(adapters))]
    with _quiet():
        if features.layers_take_config:
            peft_layer = cls(
                base,
                names[0],
                config=_config(first, fan_in_fan_out),
                r=first.rank,
                lora_alpha=_alpha(first),
                **extra,
            )
            for name, adapter in zip(names[1:], others, strict=True):
                peft_layer.update_layer(
                    name, adapter.rank, _alpha(adapter), config=_config(adapter, fan_in_fan_out)
                )
        else:
            settings = _settings(first, fan_in_fan_out) | extra
            peft_layer = cls(base, names[0], **_keywords(_initialisers(cls), settings))
            for name, adapter in zip(names[1:], others, strict=True):
                # fan_in_fan_out is the layer's, set by its __init__
                settings = _settings(adapter, fan_in_fan_out=False)
                peft_layer.update_layer(name, **_keywords([peft_layer.update_layer], settings))
        if features.set_adapter_takes_inference_mode:
            peft_layer.set_adapter(names, inference_mode=True)
        else:  # before 0.18.0: the adapters turn trainable; _load freezes what it loads
            peft_layer.set_adapter(names)
    for index, adapter in enumerate(adapters):
        _load(peft_layer, _name(index), adapter, embedding=kind == "embedding")
    return peft_layer


def _alpha(adapter: LoraAdapter) -> float:
    return float(adapter.rank) if adapter.alpha is None else float(adapter.alpha)


def _load(peft_layer: Any, name: str, adapter: LoraAdapter, *, embedding: bool) -> None:
    """Put ``adapter``'s tensors into PEFT's adapter ``name`` as they are (same storage,
    dtype and strides), replacing what PEFT initialised."""

    def frozen(tensor: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(tensor.detach(), requires_grad=False)

    if embedding:
        peft_layer.lora_embedding_A[name] = frozen(adapter.lora_A)
        peft_layer.lora_embedding_B[name] = frozen(adapter.lora_B)
    else:
        peft_layer.lora_A[name].weight = frozen(adapter.lora_A)
        peft_layer.lora_B[name].weight = frozen(adapter.lora_B)
        if adapter.lora_bias is not None:
            peft_layer.lora_B[name].bias = frozen(adapter.lora_bias.reshape(-1))
    if adapter.magnitude is not None:
        magnitudes = peft_layer.lora_magnitude_vector
        if name not in magnitudes:
            # PEFT lost it (before 0.12.0, each DoRA adapter's init replaced the dict of
            # magnitudes): its merge fails as it would on PEFT's own model.
            return
        dora = magnitudes[name]
        if isinstance(dora, torch.Tensor):  # before 0.12.0: a Parameter, not a DoRA module
            magnitudes[name] = frozen(adapter.magnitude.reshape(dora.shape))
        else:
            dora.weight = frozen(adapter.magnitude.reshape(dora.weight.shape))


def _detached(peft_layer: Any, layer: nn.Module) -> Any:
    """``peft_layer``, kept until unfuse, without ``layer`` as its base layer: the map would
    otherwise keep ``layer`` alive forever (its value would own its key). A ``Conv1D``
    shell (see :func:`_as_conv1d`) holds only the layer's Parameters and stays."""
    if peft_layer._modules.get("base_layer") is layer:
        peft_layer._modules["base_layer"] = None
    return peft_layer


def _reattached(peft_layer: Any, layer: nn.Module) -> Any:
    if peft_layer._modules.get("base_layer") is None:
        peft_layer._modules["base_layer"] = layer
    return peft_layer
