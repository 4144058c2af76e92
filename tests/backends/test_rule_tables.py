"""One base rule table: x86 is the base, XNNPACK states its differences; order is match order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.rules import BASE_RULES, X86, XNNPACK, xnnpack_scheme
from qgraph.core.errors import ConfigError
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.core.opsets import ACTIVATION_OPS, MATMUL_OPS, MUL_OPS
from qgraph.passes.prepare.annotate import Annotate
from qgraph.quant.rules import Backend, OpRule, derive_rules

aten = torch.ops.aten

# The tables as they were written out by hand in x86.py and xnnpack.py before they were
# derived from one base; the derived tables must list the same rules in the same order.
X86_NAMES = [
    "conv_relu", "conv", "linear_relu", "linear", "matmul", "add_relu", "add", "mul",
    "cat", "hardswish", "averaging", "max_pool", "activation", "shape", "dropout", "embedding",
]  # fmt: skip
XNNPACK_NAMES = [
    "conv_relu", "conv", "linear_relu", "linear", "add_relu", "add", "mul_relu", "mul",
    "cat", "hardswish", "averaging", "max_pool", "activation", "shape", "dropout", "embedding",
]  # fmt: skip


def test_derived_tables_list_the_rules_in_their_old_order():
    assert [r.name for r in X86.rules] == X86_NAMES
    assert [r.name for r in XNNPACK.rules] == XNNPACK_NAMES


def test_the_backends_share_the_base_rules_and_differ_only_in_mul_relu_and_matmul():
    assert tuple(X86.rules) == BASE_RULES
    base = {r.name: r for r in BASE_RULES}
    shared = [r for r in XNNPACK.rules if r.name in base]
    assert all(r is base[r.name] for r in shared)  # the same objects, not copies that may drift
    (extra,) = [r for r in XNNPACK.rules if r.name not in base]
    assert extra.name == "mul_relu" and extra.chain == (MUL_OPS, ACTIVATION_OPS)
    assert extra.inputs == base["mul"].inputs and extra.check is base["mul"].check
    assert set(base) - {r.name for r in XNNPACK.rules} == {"matmul"}
    assert not XNNPACK.covered_ops() & MATMUL_OPS and MATMUL_OPS <= X86.covered_ops()


class _MulRelu(nn.Module):
    def forward(self, a, b):
        return torch.relu(a * b) @ b.transpose(1, 2)


@pytest.mark.parametrize(
    ("backend", "mul_rule", "relu_rule", "matmul_quantized"),
    [(XNNPACK, "mul_relu", "mul_relu", False), (X86, "mul", "activation", True)],
)
def test_the_difference_shows_in_the_annotations(backend, mul_rule, relu_rule, matmul_quantized):
    x = torch.randn(2, 4, 4)
    gm = Annotate(backend, is_qat=False)(qgraph.capture(_MulRelu(), (x, x))).graph_module
    (mul,) = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]
    (relu,) = [n for n in gm.graph.nodes if n.target == aten.relu.default]
    (matmul,) = [n for n in gm.graph.nodes if n.target in MATMUL_OPS]
    # XNNPACK fuses the relu into mul's pattern; x86 quantizes it as a pass-through activation.
    assert mul.meta[ANNOTATION_KEY].rule == mul_rule and relu.meta[ANNOTATION_KEY].rule == relu_rule
    assert (ANNOTATION_KEY in matmul.meta) is matmul_quantized


def test_derive_rules_refuses_a_name_the_base_does_not_have():
    with pytest.raises(ConfigError, match=r"\['matmull'\] name no rule of the base table"):
        derive_rules(BASE_RULES, remove=("matmull",))
    rule = OpRule("mul_relu", (MUL_OPS, ACTIVATION_OPS))
    with pytest.raises(ConfigError, match=r"\['mull'\] name no rule"):
        derive_rules(BASE_RULES, add_before={"mull": rule})


def _backend(rules) -> Backend:
    return Backend(name="test", rules=rules, default_scheme=xnnpack_scheme)


def test_a_table_whose_earlier_rule_takes_a_later_rules_nodes_is_refused():
    base = {r.name: r for r in BASE_RULES}
    # conv alone before conv_relu: conv would take every conv that conv_relu fuses.
    with pytest.raises(ConfigError, match="'conv' comes before 'conv_relu'.*same anchor ops with a shorter chain"):
        _backend([base["conv"], base["conv_relu"]])
    # a pass-through relu before add_relu: the relu would be taken out of add_relu's chain.
    with pytest.raises(ConfigError, match="'activation' comes before 'add_relu'.*fuses after its anchor"):
        _backend([base["activation"], base["add_relu"]])
    # mul_relu added after mul (keyed by the rule after mul) is refused the same way.
    late = OpRule("mul_relu", (MUL_OPS, ACTIVATION_OPS))
    with pytest.raises(ConfigError, match="'mul' comes before 'mul_relu'"):
        _backend(derive_rules(BASE_RULES, add_before={"cat": late}))
    with pytest.raises(ConfigError, match=r"\['conv'\] appear more than once"):
        _backend([base["conv"], base["conv"]])
    assert [r.name for r in _backend([base["conv_relu"], base["conv"]]).rules] == ["conv_relu", "conv"]
