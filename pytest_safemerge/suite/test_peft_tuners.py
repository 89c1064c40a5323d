"""The tuner contract, as ``pytest --safemerge-peft`` collects it: every tuner of the
installed PEFT other than LoRA that merges."""

from pytest_safemerge.peft_suite.tuner_contract import PeftTunerSuite


class TestPeftTuners(PeftTunerSuite):
    """Every property of the tuner contract, on every tuner the installed PEFT has."""
