"""The PEFT model contract, as ``pytest --safemerge-peft`` collects it: PEFT's model-level
merge entry points on tiny models of every LoRA layer kind."""

from pytest_safemerge.peft_suite.model_contract import PeftModelSuite


class TestPeftModels(PeftModelSuite):
    """Every property of the model contract, against the installed PEFT."""
