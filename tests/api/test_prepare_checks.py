"""prepare_* refuses what it cannot prepare, and names in a config or debug_node must exist."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import qgraph
from qgraph.core.errors import ConfigError
from qgraph.observers.base import QUANTIZER_TYPES


def _quantizers(gm: torch.nn.Module) -> int:
    return sum(isinstance(m, QUANTIZER_TYPES) for m in gm.modules())


def test_prepared_or_converted_models_are_refused_and_left_alone(conv_bn_net, image_batch):
    prepared = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(prepared, [image_batch], progress=False)
    count = _quantizers(prepared)
    for fn in (qgraph.prepare_ptq, qgraph.prepare_qat):
        with pytest.raises(ConfigError, match="already prepared"):
            fn(prepared, (image_batch,))
    assert _quantizers(prepared) == count
    with pytest.raises(ConfigError, match="already converted"):
        qgraph.prepare_qat(qgraph.convert(prepared), (image_batch,))


def test_a_module_that_holds_a_prepared_graph_is_refused(conv_bn_net, image_batch):
    """Detected by its quantizer submodules, without qgraph's meta on the outer module."""
    holder = torch.nn.Sequential(qgraph.prepare_qat(copy.deepcopy(conv_bn_net).train(), (image_batch,)))
    with pytest.raises(ConfigError, match="already prepared"):
        qgraph.prepare_qat(holder, (image_batch,))


def test_float64_model_is_refused_at_prepare(conv_bn_net, image_batch):
    with pytest.raises(ConfigError, match=r"'conv1.weight' is float64.*model.float\(\)"):
        qgraph.prepare_ptq(copy.deepcopy(conv_bn_net).double(), (image_batch.double(),))


def test_module_name_patterns_must_match_a_module(conv_bn_net, image_batch):
    ok = qgraph.QConfig().set_module_name("fc", None).set_module_name(r"conv\d", None)
    qgraph.prepare_ptq(conv_bn_net, (image_batch,), config=ok)  # a name and a regular expression
    for pattern, closest in (("fcc", "'fc'"), ("conv3", "'conv1'"), ("classifier", None)):
        with pytest.raises(ConfigError, match=f"set_module_name\\('{pattern}'") as info:
            qgraph.prepare_ptq(conv_bn_net, (image_batch,), config=qgraph.QConfig().set_module_name(pattern, None))
        assert (closest in str(info.value)) if closest else "modules: " in str(info.value)


def test_debug_node_must_name_a_node(conv_bn_net, image_batch, monkeypatch, caplog):
    with pytest.raises(ConfigError, match=r"debug_node='conv2d_9'.*closest: 'conv2d_1'"):
        qgraph.prepare_ptq(conv_bn_net, (image_batch,), debug_node="conv2d_9")
    monkeypatch.setenv("QGRAPH_DEBUG_NODE", "linerar")
    with pytest.raises(ConfigError, match=r"QGRAPH_DEBUG_NODE='linerar'.*'linear'"):
        qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    monkeypatch.delenv("QGRAPH_DEBUG_NODE")
    with caplog.at_level(logging.WARNING, logger="qgraph.annotate"):
        qgraph.prepare_ptq(conv_bn_net, (image_batch,), debug_node="linear")
    assert "node linear: rule linear_relu refused" in caplog.text
