"""safemerge's conformance suite: subclass :class:`ConformanceSuite` to run it in your tests."""

from pytest_safemerge.suite.contract import ConformanceSuite

__all__ = ["ConformanceSuite"]
