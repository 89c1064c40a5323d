"""The tensor-level conformance suite, as ``pytest --safemerge-impl=MODULE:OBJECT`` collects it."""

from pytest_safemerge.suite.contract import ConformanceSuite


class TestConformance(ConformanceSuite):
    """Every property of the contract, against the implementation ``safemerge_impl`` gives."""
