"""Fixtures for tests of merge code: the implementation under test, a guarded fuse that
cannot leak fused state, and factories for layers and adapters.

The factories are session-scoped (Hypothesis warns about function-scoped fixtures under
``@given``); torch and safemerge are imported when a fixture is first used, not when
pytest loads the plugin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pytest_safemerge.options import SETTINGS_KEY, Settings


@pytest.fixture(scope="session")
def safemerge_settings(request: pytest.FixtureRequest) -> Settings:
    """The ``--safemerge-*`` options of this run (command line over ini)."""
    return request.config.stash[SETTINGS_KEY]


@pytest.fixture(scope="session")
def safemerge_impl(safemerge_settings: Settings) -> Any:
    """The merge implementation the conformance suite checks.

    ``--safemerge-impl=MODULE:OBJECT`` names it; safemerge's own engine otherwise.
    Override this fixture (in a conftest.py, or in a subclass of
    ``pytest_safemerge.suite.ConformanceSuite``) to return your own object with
    ``fuse(weight, lora_A, lora_B, scale)`` and optionally ``unfuse`` and
    ``exact_unfuse = True``.
    """
    from pytest_safemerge.implementations import load_implementation

    return load_implementation(safemerge_settings.impl).target


@pytest.fixture
def safemerge_fuse() -> Iterator[Callable[..., Any]]:
    """A guarded fuse for use in a test: ``safemerge_fuse(layer, adapters, scale=1.0)``.

    ``layer`` is anything :func:`safemerge.fuse` takes, or a bare 2-D weight tensor
    (:func:`safemerge.fuse_weight`). At teardown every fuse is undone exactly, latest
    first, and each layer is checked to hold again every bit it held before: a test that
    changed a fused layer (or fused around this fixture) errors instead of leaking state.
    """
    import safemerge

    fused: list[tuple[Any, Any, str, str]] = []

    def fuse(layer: Any, adapters: Any, *, scale: float = 1.0, name: str | None = None) -> Any:
        label = name or type(layer).__name__
        digest = layer_digest(layer)
        record: safemerge.FuseRecord | safemerge.QuantizedFuseRecord
        if _is_tensor(layer):
            record = safemerge.fuse_weight(layer, adapters, scale=scale, name=label)
        else:
            record = safemerge.fuse(layer, adapters, scale=scale, name=label)
        fused.append((layer, record, digest, label))
        return record

    yield fuse
    problems = []
    for layer, record, digest, label in reversed(fused):
        try:
            if _is_tensor(layer):
                safemerge.unfuse_weight(layer, record)
            else:
                safemerge.unfuse(layer, record)
        except safemerge.SafemergeError as error:
            problems.append(f"{label}: could not be unfused exactly: {error}")
            continue
        if layer_digest(layer) != digest:
            problems.append(f"{label}: after the exact unfuse it does not hold its original bits")
    if problems:
        pytest.fail(
            "safemerge_fuse could not restore what the test fused (was a fused layer "
            "changed during the test?):\n  " + "\n  ".join(problems),
            pytrace=False,
        )


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def layer_digest(layer: Any) -> str:
    """SHA-256 of every tensor a layer holds (its weight's quantization state included)."""
    import torch

    tensors = [("", layer)] if _is_tensor(layer) else _tensors_of(layer)
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tensors_of(layer: Any) -> list[tuple[str, Any]]:
    import torch

    found = [(f"state.{key}", value) for key, value in layer.state_dict().items()]
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    for key, value in sorted(vars(state).items()) if state is not None else ():
        if isinstance(value, torch.Tensor):
            found.append((f"quant_state.{key}", value))
    return [(name, value) for name, value in found if isinstance(value, torch.Tensor)]


@pytest.fixture(scope="session")
def safemerge_layer_factory() -> Callable[..., Any]:
    """Make a layer: ``make("linear", 32, 16, dtype=torch.bfloat16, seed=0)``.

    Kinds: ``"linear"``, ``"embedding"``, ``"conv1d"``, ``"conv2d"``, ``"conv3d"``,
    ``"fan_in_fan_out"`` (weight stored ``(in, out)``), and bitsandbytes ``"nf4"``,
    ``"fp4"``, ``"int8"`` (options ``blocksize``, ``nested``, ``threshold``).
    """
    import torch

    from safemerge import synthetic

    def make(
        kind: str = "linear",
        in_features: int = 32,
        out_features: int = 16,
        *,
        dtype: Any = None,
        seed: int = 0,
        **options: Any,
    ) -> Any:
        if kind in synthetic.QUANTIZED_KINDS:
            base = synthetic.random_layer("linear", in_features, out_features, seed=seed)
            assert isinstance(base.weight, torch.Tensor)
            return synthetic.quantized_linear(base.weight, kind, **options)
        return synthetic.random_layer(
            kind, in_features, out_features, dtype=dtype or torch.float32, seed=seed, **options
        )

    return make


@pytest.fixture(scope="session")
def safemerge_adapter_factory() -> Callable[..., Any]:
    """Make a LoRA adapter that fits a layer: ``make(layer, rank=8, alpha=16, seed=0)``.

    Options: ``std`` (of ``lora_B``), ``use_rslora``, ``dora``, ``lora_bias``, and
    ``poison="nan" | "+inf" | "-inf"`` to plant that value in the last element of
    ``lora_B`` (a training blow-up).
    """
    from safemerge import synthetic

    poisons = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}

    def make(layer: Any, *, poison: str | None = None, **options: Any) -> Any:
        adapter = synthetic.random_adapter(layer, **options)
        if poison is not None:
            if poison not in poisons:
                raise ValueError(f"poison={poison!r}: choose one of {', '.join(poisons)}")
            adapter.lora_B.view(-1)[-1] = poisons[poison]
        return adapter

    return make
