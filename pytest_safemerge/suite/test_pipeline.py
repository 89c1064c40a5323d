"""The pipeline suite, as ``pytest --safemerge-pipeline=MODULE:OBJECT`` collects it."""

from pytest_safemerge.suite.pipeline_contract import PipelineConformanceSuite


class TestPipelineConformance(PipelineConformanceSuite):
    """Every property of the pipeline contract, against the object ``--safemerge-pipeline``
    names."""
