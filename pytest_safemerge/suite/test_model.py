"""The model suite: ``pytest --safemerge-model=PATH [--safemerge-adapter=PATH]
[--safemerge-quant=nf4|fp4|int8]``.

One test per weight, so pytest's progress shows how far the run is and a failure names
the layer. Weights are read one at a time, when their test runs.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest

import safemerge
from pytest_safemerge import assertions, models
from pytest_safemerge.fixtures import layer_digest
from pytest_safemerge.implementations import Implementation
from pytest_safemerge.options import SETTINGS_KEY, Settings
from pytest_safemerge.results import start_row
from pytest_safemerge.strategies import MergeCase
from pytest_safemerge.suite import checks, layer_cases
from pytest_safemerge.suite.checks import Checked
from pytest_safemerge.suite.contract import as_implementation


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = metafunc.config.stash[SETTINGS_KEY]
    plan = models.plan_for(metafunc.config, settings)
    reasons = {
        "model_layer": "no weight of the model was selected",
        "adapter_layer": "no --safemerge-adapter given, or it did not load",
        "quant_layer": "no --safemerge-quant given",
    }
    for fixture, names in (
        ("model_layer", plan.layers),
        ("adapter_layer", plan.adapter_layers),
        ("quant_layer", plan.quant_layers),
    ):
        if fixture not in metafunc.fixturenames:
            continue
        if names:
            metafunc.parametrize(fixture, names, ids=names)
        else:
            skipped = pytest.param(None, marks=pytest.mark.skip(reason=reasons[fixture]))
            metafunc.parametrize(fixture, [skipped], ids=["none"])


@pytest.fixture(scope="session")
def plan(request: pytest.FixtureRequest, safemerge_settings: Settings) -> models.ModelPlan:
    return models.plan_for(request.config, safemerge_settings)


@pytest.fixture
def implementation(safemerge_impl: Any, safemerge_settings: Settings) -> Implementation:
    return as_implementation(safemerge_impl, safemerge_settings)


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def test_layer_merges(
    request: pytest.FixtureRequest,
    model_layer: str,
    plan: models.ModelPlan,
    implementation: Implementation,
    safemerge_settings: Settings,
) -> None:
    """Generated adapters fuse accurately into this real weight (and unfuse), a NaN or Inf
    adapter is refused with the weight untouched, and so is a sum overflowing its dtype."""
    row = start_row(
        request.node,
        contract="model",
        prop="model layers",
        target=implementation.spec,
        layer=model_layer,
    )
    matrix = layer_cases.as_matrix(plan.read(model_layer, safemerge_settings))
    device = safemerge_settings.device
    seed = _seed(model_layer)
    for case in layer_cases.generated_cases(matrix, safemerge_settings.layer_examples, seed=seed):
        row.example("random")
        checked = Checked(case, device)
        checks.check_accurate(implementation, checked, row)
        if implementation.has_unfuse:
            checks.check_round_trip(implementation, checked.again(), row)
    refused = layer_cases.poisoned_cases(matrix, seed=seed)
    overflow = layer_cases.cast_overflow_case(matrix)
    if overflow is not None:
        refused.append(overflow)
    for case in refused:
        row.example(case.kind)
        checks.check_refused_atomically(implementation, Checked(case, device), row)


def test_adapter_loads(plan: models.ModelPlan, safemerge_settings: Settings) -> None:
    """The adapter is a readable PEFT, kohya or diffusers adapter whose every key maps to
    exactly one weight of the model with a fitting shape."""
    if safemerge_settings.adapter is None:
        pytest.skip("no --safemerge-adapter given")
    if plan.adapter_error is not None:
        pytest.fail(f"the adapter {safemerge_settings.adapter} did not load: {plan.adapter_error}")


def test_adapter_layer(
    request: pytest.FixtureRequest,
    adapter_layer: str,
    plan: models.ModelPlan,
    implementation: Implementation,
    safemerge_settings: Settings,
) -> None:
    """The real adapter fuses into this layer without a non-finite value, within the
    merge's bound; the merged layer's outputs match the unmerged adapter's within their
    bound; and the unfuse restores the weight (exactly, if the implementation claims it)."""
    row = start_row(
        request.node,
        contract="model",
        prop="adapter layers",
        target=implementation.spec,
        layer=adapter_layer,
    )
    adapter = plan.adapter.layers[adapter_layer]
    if adapter.magnitude is not None:
        pytest.skip(
            "a DoRA layer renormalises each output channel: that is not the tensor contract "
            "fuse(weight, lora_A, lora_B, scale), so it is not checked here"
        )
    weight = plan.read(adapter_layer, safemerge_settings)
    kind = plan.adapter.kinds.get(adapter_layer, "linear")
    if adapter.fan_in_fan_out:
        kind = "fan_in_fan_out"
    matrix, lora_A, lora_B = safemerge.matrix_form(weight, adapter.lora_A, adapter.lora_B, kind)
    scale = adapter.scale * safemerge_settings.scale
    case = MergeCase(matrix, safemerge.LoraAdapter(lora_A, lora_B), scale, "adapter")
    checked = Checked(case, safemerge_settings.device)
    row.example("adapter")
    call = implementation.fuse(checked.weight, checked.lora_A, checked.lora_B, checked.coefficient)
    if call.refused:
        assertions.assert_atomic(checked.original, checked.weight.detach().cpu())
        pytest.fail(
            f"the adapter's merge into {adapter_layer} was refused: "
            f"{type(call.error).__name__}: {call.error}",
            pytrace=False,
        )
    checks.check_not_silently_non_finite("adapter", checked, call)
    assert call.result is not None
    fused = call.result.detach().cpu()
    row.observe(checked.fraction(fused))
    assertions.assert_within_bound(
        fused, checked.reference, checked.bound, what=f"[adapter] {adapter_layer}"
    )
    merged, unmerged, bound = layer_cases.output_check(
        fused, checked.original, lora_A, lora_B, scale, checked.bound, seed=_seed(adapter_layer)
    )
    row.observe(checks.worst_fraction(merged, unmerged, bound))
    assertions.assert_within_bound(
        merged, unmerged, bound, what=f"[adapter] the outputs of {adapter_layer}, merged"
    )
    if implementation.has_unfuse:
        checks.check_round_trip(implementation, checked.again(), row)


def test_quantized_layer(
    request: pytest.FixtureRequest,
    quant_layer: str,
    plan: models.ModelPlan,
    safemerge_settings: Settings,
) -> None:
    """Through bitsandbytes (``--safemerge-quant``): safemerge's quantized fuse keeps every
    element within its block's rounding bound, a NaN adapter is refused with every byte
    kept, and the exact unfuse restores every byte of the packed weight and its state."""
    from safemerge import synthetic

    quant = safemerge_settings.quant
    assert quant is not None
    row = start_row(
        request.node,
        contract="model",
        prop=f"quantized layers ({quant})",
        target="safemerge",
        kind=quant,
        layer=quant_layer,
    )
    weight = plan.read(quant_layer, safemerge_settings).float()
    layer = synthetic.quantized_linear(weight, quant, device=safemerge_settings.device)
    adapter = plan.adapter.layers.get(quant_layer) if plan.adapter is not None else None
    plain = (
        adapter is not None
        and adapter.magnitude is None
        and plan.adapter.kinds.get(quant_layer) == "linear"
    )
    if not plain or adapter is None:
        adapter = synthetic.random_adapter(layer, seed=_seed(quant_layer))
    before = layer_digest(layer)
    held, _ = safemerge.quantization_bound(layer, weight)
    scale = adapter.scale * safemerge_settings.scale
    record = safemerge.fuse(layer, adapter, scale=safemerge_settings.scale, name=quant_layer)
    row.example("adapter" if plain else "random")
    assert isinstance(record, safemerge.QuantizedFuseRecord)
    row.observe(record.worst_error_of_bound)
    assertions.assert_within_quant_bound(layer, held, adapter.lora_A, adapter.lora_B, scale)
    safemerge.unfuse(layer, record)
    assert layer_digest(layer) == before, f"[quantized] {quant_layer}: the exact unfuse lost bytes"
    poisoned = synthetic.random_adapter(layer, seed=_seed(quant_layer) + 1)
    poisoned.lora_B.view(-1)[-1] = float("nan")
    row.example("nan")
    with pytest.raises(safemerge.NonFiniteMergeError):
        safemerge.fuse(layer, poisoned, name=quant_layer)
    assert layer_digest(layer) == before, f"[quantized] {quant_layer}: a refused fuse changed bytes"
