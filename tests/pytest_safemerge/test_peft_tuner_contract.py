"""The tuner contract has power and explores: a broken merge fails the right check, every
trainable parameter of an adapter is planted, every flag of a tuner gets its run, and the
tuners are found by introspection."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")

from pytest_safemerge.peft_suite import tuner_checks, tuner_configs, tuners
from pytest_safemerge.peft_suite.tuner_cases import build_case
from pytest_safemerge.peft_suite.tuner_contract import tuner_runs
from pytest_safemerge.results import Row


def _row() -> Row:
    return Row({"examples": 0, "worst_fraction": None, "kinds": {}, "message": ""})


def _loha(kind: str = "linear", dtype: torch.dtype = torch.float32, **options: object):  # type: ignore[no-untyped-def]
    return build_case(tuners.installed_tuners()["loha"], kind, dtype, {"r": 2, **options}, 5)


def test_tuners_are_found_by_introspection() -> None:
    found = tuners.installed_tuners()
    assert "lora" not in found
    for name in ("loha", "lokr", "ia3", "oft", "boft"):  # in every release since 0.10
        assert name in found and found[name].layer_classes
    assert tuners.missing_reason("loha") is None
    assert "has no NOSUCH tuner" in str(tuners.missing_reason("nosuch"))


def test_a_correct_merge_passes_every_check() -> None:
    for check in (
        tuner_checks.check_accurate,
        tuner_checks.check_round_trip,
        tuner_checks.check_refused,
        tuner_checks.check_atomic,
        tuner_checks.check_merge_twice,
    ):
        row = _row()
        check(_loha("conv2d", torch.bfloat16), row)
        assert row.data["worst_fraction"] is not None and row.data["worst_fraction"] <= 1


def test_a_delta_off_by_a_little_fails_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lycoris_utils import LycorisLayer

    original = LycorisLayer.merge

    # The merge adds 1% more delta than the forward uses (patching get_delta_weight would
    # change both): far outside one float32 rounding, inside any "looks fine" tolerance.
    def merges_a_little_more(self, safe_merge: bool = False, adapter_names=None):  # type: ignore[no-untyped-def]
        original(self, safe_merge=safe_merge, adapter_names=adapter_names)
        self.get_base_layer().weight.data += 0.01 * self.get_delta_weight("default")

    monkeypatch.setattr(LycorisLayer, "merge", merges_a_little_more)
    with pytest.raises(AssertionError, match=r"\[tuner accuracy\]"):
        tuner_checks.check_accurate(_loha(), _row())


def test_an_unmerge_that_forgets_fails_the_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lycoris_utils import LycorisLayer

    monkeypatch.setattr(LycorisLayer, "unmerge", lambda self: self.merged_adapters.clear())
    with pytest.raises(AssertionError, match=r"\[tuner round trip\]"):
        tuner_checks.check_round_trip(_loha(), _row())


def test_an_unguarded_merge_fails_refusal_and_a_merge_twice_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft.tuners.lycoris_utils import LycorisLayer

    def unguarded(self, safe_merge: bool = False, adapter_names=None):  # type: ignore[no-untyped-def]
        self.get_base_layer().weight.data += self.get_delta_weight("default")
        self.merged_adapters.append("default")

    monkeypatch.setattr(LycorisLayer, "merge", unguarded)
    with pytest.raises(AssertionError, match=r"\[tuner refusal\] .* did not refuse"):
        tuner_checks.check_refused(_loha(), _row())
    with pytest.raises(AssertionError, match=r"\[tuner merge twice\]"):
        tuner_checks.check_merge_twice(_loha(), _row())


def test_a_refusal_after_writing_fails_atomicity(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft.tuners.lycoris_utils import LycorisLayer

    def writes_then_refuses(self, safe_merge: bool = False, adapter_names=None):  # type: ignore[no-untyped-def]
        self.get_base_layer().weight.data += self.get_delta_weight("default")
        raise ValueError("NaNs detected")

    monkeypatch.setattr(LycorisLayer, "merge", writes_then_refuses)
    with pytest.raises(AssertionError, match=r"\[tuner atomicity\] .* changed base_layer.weight"):
        tuner_checks.check_atomic(_loha(), _row())


def test_every_trainable_parameter_is_planted_with_every_value() -> None:
    case = _loha("conv2d", use_effective_conv2d=True)
    names = set(case.trainable())
    assert {"hada_t1.default", "hada_t2.default", "hada_w1_a.default"} <= names
    row = _row()
    tuner_checks.check_refused(case, row)
    planted = row.data["planted"]
    assert names <= set(planted)
    assert {"nan", "+inf", "-inf"} <= set(planted)


def test_adapters_are_random_and_nonzero() -> None:
    case = _loha()
    for name, parameter in case.trainable().items():
        assert bool((parameter != 0).all()), name
    delta = tuner_checks.effective_map(case.layer, "linear").weight
    base = tuner_checks.base_map(case.layer, "linear").weight
    assert float((delta - base).abs().max()) > 1e-2  # a real delta, not the identity


def test_every_flag_gets_its_run_and_every_option_is_drawn() -> None:
    runs, refused = tuner_runs("lokr")
    flags = {run.flag for run in runs if run.flag}
    assert flags == {"decompose_both", "use_effective_conv2d"}
    assert next(r for r in runs if r.flag == "use_effective_conv2d").kind == "conv2d"
    assert "embedding" in refused
    lokr = tuners.installed_tuners()["lokr"]
    assert tuner_configs.lacking(lokr) == ()
    strategy = tuner_configs.config_options(lokr, frozenset({"decompose_both"}))
    assert "decompose_both': just(True)" in repr(strategy)
    assert "decompose_factor': sampled_from((-1, 2, 4))" in repr(strategy)


def test_the_bound_is_one_rounding_plus_the_float32_delta() -> None:
    assert tuner_checks.unit_roundoff(torch.bfloat16) == 2.0**-8
    assert tuner_checks.unit_roundoff(torch.float32) == 2.0**-24
    assert math.isinf(tuner_checks._fraction(torch.tensor([math.nan]), torch.tensor([1.0])))


def test_a_value_the_layer_never_reads_need_not_be_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    if "pvera" not in tuners.installed_tuners():
        pytest.skip(f"PEFT {tuners.peft_version()} has no PVeRA")
    case = build_case(tuners.installed_tuners()["pvera"], "linear", torch.float32, {"r": 2}, 0)
    name = "pvera_lambda_d.default"
    every = [tuner_checks.Plant(name, i, "+inf") for i in range(case.trainable()[name].numel())]
    unread = [plant for plant in every if not tuner_checks._reaches(case, plant)]
    assert 0 < len(unread) < len(every)  # in eval, PVeRA reads the mean half only
    monkeypatch.setattr(tuner_checks, "plants", lambda case: unread)
    row = _row()
    tuner_checks.check_refused(case, row)
    assert row.data["planted"]["unread"] == len(unread)


def test_each_case_is_built_once_and_every_check_gets_its_own_copy() -> None:
    first, second = _loha(), _loha()
    assert first.layer is not second.layer and first.maps is second.maps
    tuner_checks.check_accurate(first, _row())  # merges first, reads the shared maps
    assert not second.layer.merged and "unmerged" in second.maps
    planted = second.copy()
    assert planted.maps == {} and planted.maps is not second.maps


def test_a_tuner_that_never_merges_is_named_so() -> None:
    assert tuners.merge_refusal("loha") is None
    if "shadow" in tuners.installed_tuners():
        assert "SHADOW does not merge" in str(tuners.merge_refusal("shadow"))
