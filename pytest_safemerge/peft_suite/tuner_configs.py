"""Randomized configs for each tuner: its rank and scale, and its own options.

Each tuner has a table of its options (:data:`TUNER_OPTIONS`): a config field and the
values drawn for it. A *flag* (``decompose_both``, ``coft``, IA3's feedforward) also gets
a run of its own with the flag forced on, so every flag is met in every cell it applies
to, whatever the budget. Fields that size an adapter (``r``, ``n_frequency``, block
sizes) get values that fit the contract's tiny layers (16 inputs, 8 outputs) wherever a
tuner has them (:data:`SIZE_FIELDS`): a tuner the table does not know (a new release's)
still runs, on its defaults and these sizes. An option the installed config class lacks
is dropped and named (:func:`lacking`), never passed: the contract runs on older APIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from pytest_safemerge.peft_suite.tuners import Tuner


@dataclass(frozen=True)
class Option:
    """A config field drawn from ``values``; a ``flag`` gets a run with it forced on."""

    field: str
    values: tuple[Any, ...]
    flag: bool = False


def _flag(field: str) -> Option:
    return Option(field, (False, True), flag=True)


#: IA3's feedforward option is not a field of its own: it is ``feedforward_modules``
#: naming the target (the scaling then multiplies the layer's input, not its output).
FEEDFORWARD = "feedforward"

TUNER_OPTIONS: Mapping[str, tuple[Option, ...]] = {
    "boft": (
        Option("boft_block_size", (2, 4, 8)),
        _flag("boft_n_butterfly_factor"),  # True: 2 butterfly factors instead of 1
    ),
    "fourierft": (
        Option("n_frequency", (4, 16, 64, 128)),
        Option("scaling", (1.0, 150.0)),
        Option("random_loc_seed", (0, 777, 2024)),
    ),
    "glora": (
        Option("r", (1, 2, 4)),
        Option("config_A_B", ("lora", "vector", "constant", "none")),
        Option("config_C", ("lora", "vector", "none")),
        Option("config_D_E", ("constant", "vector", "none")),
    ),
    "gralora": (Option("r", (2, 4)),),  # r must be a multiple of gralora_k (2)
    "hra": (Option("r", (2, 4, 8)), _flag("apply_GS")),
    "ia3": (_flag(FEEDFORWARD),),
    "loha": (
        Option("r", (1, 2, 4)),
        Option("alpha", (0.5, 1.0, 8.0)),
        _flag("use_effective_conv2d"),
    ),
    "lokr": (
        Option("r", (1, 2, 4)),
        Option("alpha", (0.5, 1.0, 8.0)),
        Option("decompose_factor", (-1, 2, 4)),
        _flag("decompose_both"),
        _flag("use_effective_conv2d"),
    ),
    "oft": (
        Option("oft_block_size", (2, 4, 8)),
        _flag("coft"),
        Option("eps", (1e-3, 6e-5)),
        _flag("block_share"),
        _flag("use_cayley_neumann"),
    ),
    # Which rows (tokens) the adapter replaces: below 8, a row of both the embedding (16
    # tokens) and the linear layer (8 outputs, a tied output head). PEFT's default (none)
    # is an adapter that changes nothing.
    "trainable_tokens": (Option("token_indices", ((0, 3), (1, 2, 7), (5,))),),
    "vera": (
        Option("r", (2, 4, 8)),
        Option("d_initial", (0.1, 1.0)),
        Option("projection_prng_key", (0, 1, 12345)),
    ),
}

#: Sizes that fit the tiny layers, for any tuner with these fields (its table overrides).
SIZE_FIELDS: Mapping[str, tuple[Any, ...]] = {
    "r": (1, 2, 4),
    "n_frequency": (8, 16),
    "block_size": (4,),
    "oft_block_size": (4,),
    "boft_block_size": (4,),
    "group_size": (4,),
    "vector_length": (4,),
    "total_step": (10,),  # AdaLoRA refuses a config without one
    "init_r": (4,),
    "target_r": (2,),
}


def options_of(tuner: Tuner) -> tuple[Option, ...]:
    """The tuner's options its installed config has."""
    fields = tuner.config_fields | {FEEDFORWARD}
    return tuple(o for o in TUNER_OPTIONS.get(tuner.name, ()) if o.field in fields)


def default_options(tuner: Tuner) -> dict[str, Any]:
    """Each size field's and option's first value (Hypothesis's simplest draw): the config
    that decides whether a layer kind takes the tuner at all."""
    fields = tuner.config_fields
    options = {name: values[0] for name, values in SIZE_FIELDS.items() if name in fields}
    options.update({option.field: option.values[0] for option in options_of(tuner)})
    return options


def flags_of(tuner: Tuner) -> tuple[str, ...]:
    """The tuner's flags its installed config has: each gets a run of its own."""
    return tuple(o.field for o in options_of(tuner) if o.flag)


def lacking(tuner: Tuner) -> tuple[str, ...]:
    """The options of the table the installed config lacks (named in the cell's row)."""
    fields = tuner.config_fields | {FEEDFORWARD}
    return tuple(o.field for o in TUNER_OPTIONS.get(tuner.name, ()) if o.field not in fields)


def config_options(tuner: Tuner, forced: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
    """The option values of one config: sizes, the tuner's options, ``forced`` flags on."""
    fields = tuner.config_fields
    drawn: dict[str, st.SearchStrategy[Any]] = {
        name: st.sampled_from(values) for name, values in SIZE_FIELDS.items() if name in fields
    }
    for option in options_of(tuner):
        on = option.flag and option.field in forced
        drawn[option.field] = st.just(True) if on else st.sampled_from(option.values)
    return st.fixed_dictionaries(drawn)


def build_config(
    tuner: Tuner, options: Mapping[str, Any], target: str, kind_fields: Mapping[str, Any]
) -> Any:
    """The tuner's config targeting the module ``target``: ``options`` (as drawn),
    and the layer kind's fields (``fan_in_fan_out``)."""
    fields = tuner.config_fields
    values = {name: value for name, value in kind_fields.items() if name in fields}
    values.update({name: value for name, value in options.items() if name != FEEDFORWARD})
    if isinstance(values.get("token_indices"), tuple):
        values["token_indices"] = list(values["token_indices"])  # drawn as a hashable tuple
    if "boft_n_butterfly_factor" in values:
        values["boft_n_butterfly_factor"] = 2 if values["boft_n_butterfly_factor"] else 1
    if "oft_block_size" in values and "r" in fields:
        values["r"] = 0  # OFT takes a block size or a number of blocks, not both
    if "boft_block_size" in values and "boft_block_num" in fields:
        values["boft_block_num"] = 0
    if tuner.name == "ia3":
        values["feedforward_modules"] = [target] if options.get(FEEDFORWARD) else []
    return tuner.config_class(target_modules=[target], **values)


def describe(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in sorted(options.items())) or "defaults"
