"""The module-level conformance suite, as ``pytest --safemerge-impl=MODULE:OBJECT`` collects it
(when the implementation has ``fuse_layer``)."""

from pytest_safemerge.suite.layer_contract import LayerConformanceSuite


class TestLayerConformance(LayerConformanceSuite):
    """Every property of the layer contract, against the implementation ``safemerge_impl`` gives."""
