"""An implementation's ``unsupported`` declaration: what it lacks, and why.

The tags it names leave ``layer_kinds``; a layer kind's cells are skipped with the
implementation's own reason; a ``LAYER+OPTION`` key keeps the option off that layer kind
only. A declaration the suite cannot use is refused when the implementation loads.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_safemerge.implementations import Implementation
from safemerge.names import ALL_TAGS

SPEC = "module:TARGET"


class Target:
    """A module-level implementation with the declarations given."""

    def __init__(self, **declarations: Any) -> None:
        for name, value in declarations.items():
            setattr(self, name, value)

    def fuse(self, *args: Any) -> None: ...

    def fuse_layer(self, *args: Any) -> None: ...


def _loaded(**declarations: Any) -> Implementation:
    implementation = Implementation(SPEC, Target(**declarations))
    implementation.check_declarations()
    return implementation


def test_unsupported_tags_leave_the_layer_kinds_and_skip_with_their_reason() -> None:
    reason = "release 1.0 has no Conv3d layer (added in 2.0)"
    implementation = _loaded(unsupported={"conv3d": reason, "lora-bias": "no bias on lora_B"})

    assert implementation.layer_kinds == ALL_TAGS - {"conv3d", "lora-bias"}
    assert implementation.layer_skip_reason("conv3d") == f"{SPEC}: {reason}"
    assert implementation.layer_skip_reason("linear") is None
    assert "lora-bias" not in implementation.tags_for("linear")


def test_an_undeclared_layer_kind_is_skipped_as_undeclared() -> None:
    implementation = _loaded(layer_kinds={"linear", "dora"}, unsupported={"conv3d": "none"})

    assert implementation.layer_skip_reason("conv3d") == f"{SPEC}: none"
    reason = implementation.layer_skip_reason("embedding")
    assert reason == f"{SPEC} does not declare embedding (layer_kinds = ['dora', 'linear'])"


def test_an_option_unsupported_on_one_layer_kind_stays_on_the_others() -> None:
    implementation = _loaded(unsupported={"embedding+dora": "no DoRA on Embedding"})

    assert implementation.layer_kinds == ALL_TAGS
    assert "dora" not in implementation.tags_for("embedding")
    assert implementation.tags_for("linear") == ALL_TAGS
    assert implementation.layer_skip_reason("embedding") is None


def test_an_old_spelling_of_a_layer_kind_is_accepted() -> None:
    implementation = _loaded(unsupported={"fan-in-fan-out+dora": "no DoRA on Conv1D"})

    assert "dora" not in implementation.tags_for("fan_in_fan_out")


@pytest.mark.parametrize(
    ("unsupported", "message"),
    [
        (["conv3d"], r"unsupported=\['conv3d'\] must be a mapping from tag to the reason"),
        ({"conv3d": ""}, r"must be a mapping .*\(a non-empty str\)"),
        ({"conv3d": None}, r"must be a mapping"),
        ({"qlora": "why"}, r"unsupported names unknown tags \['qlora'\]; keys are tags"),
        ({"dora+linear": "why"}, r"unknown tags \['dora\+linear'\].*LAYER\+OPTION"),
        ({"linear+conv2d": "why"}, r"unknown tags \['linear\+conv2d'\]"),
    ],
)
def test_an_unusable_declaration_is_refused_naming_the_fix(
    unsupported: object, message: str
) -> None:
    with pytest.raises(pytest.UsageError, match=message):
        _loaded(unsupported=unsupported)


def test_a_tag_both_declared_and_unsupported_is_refused() -> None:
    with pytest.raises(
        pytest.UsageError, match=r"\['conv3d'\] both declared in layer_kinds and unsupported"
    ):
        _loaded(layer_kinds={"linear", "conv3d"}, unsupported={"conv3d": "none"})


def test_a_tensor_only_implementation_is_not_held_to_layer_declarations() -> None:
    class TensorOnly:
        unsupported = ("anything",)

        def fuse(self, *args: Any) -> None: ...

    Implementation(SPEC, TensorOnly()).check_declarations()
