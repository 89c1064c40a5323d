"""safemerge's conformance suites: subclass :class:`ConformanceSuite` (the tensor contract) or
:class:`LayerConformanceSuite` (the module-level contract) to run them in your tests."""

from pytest_safemerge.suite.contract import ConformanceSuite
from pytest_safemerge.suite.layer_contract import LayerConformanceSuite

__all__ = ["ConformanceSuite", "LayerConformanceSuite"]
