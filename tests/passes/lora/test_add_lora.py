"""AddLora: adapters next to chosen linears of a prepared graph; base frozen, B = 0 is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.rules.xnnpack import xnnpack_scheme
from qgraph.core.errors import ConfigError
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import LORA_BASE_KEY, LORA_KEY, QUANTIZER_KEY
from qgraph.observers.learnable import LearnableFakeQuantize
from qgraph.passes.lora.adapter import LoraAdapter
from qgraph.passes.lora.add_lora import AddLora
from qgraph.quant.rules import QuantScheme
from qgraph.recipes.lora import add_lora
from tests.conftest import count_ops, run_pass

aten = torch.ops.aten


class Mlp(nn.Module):
    """fc1 → relu → fc2 → relu → head: two fused linear+relu chains and a plain linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def prepared(batch) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    p = qgraph.prepare_qat(Mlp().train(), (batch,))
    p(batch)  # observe once, so that eval mode has ranges
    return qgraph.eval_mode(p)


def _run(pass_, gm):
    return run_pass(pass_, gm)


def test_structure_two_linears_one_mul_one_add_per_adapter(prepared):
    gm = copy_graph_module(prepared)
    before = count_ops(gm)
    result = _run(AddLora(r=4, alpha=8, targets=r"fc\d"), gm)
    after = count_ops(result.graph_module)
    assert result.modified
    assert after[aten.linear.default] == before[aten.linear.default] + 2 * 2
    assert after[aten.mul.Tensor] == before[aten.mul.Tensor] + 2
    assert after[aten.add.Tensor] == before[aten.add.Tensor] + 2
    adapters = [m for m in result.graph_module.modules() if isinstance(m, LoraAdapter)]
    assert sorted(a.target for a in adapters) == ["fc1", "fc2"]
    a = adapters[0]
    assert a.lora_A.shape == (4, 32) and a.lora_B.shape == (64, 4) and a.scaling == 2.0
    assert torch.count_nonzero(a.lora_B) == 0
    bases = [n for n in result.graph_module.graph.nodes if LORA_BASE_KEY in n.meta]
    assert [n.meta["nn_module_stack"] for n in bases]  # base linears keep their provenance
    for base in bases:
        (add,) = base.users  # the base output goes to the adapter's add only ...
        assert add.target == aten.add.Tensor and add.meta[LORA_KEY] == base.meta[LORA_BASE_KEY]
        assert next(iter(add.users)).target == aten.relu.default  # ... which feeds the fused relu
        assert add.meta["from_node"][0].pass_name == "add_lora"


def test_adapter_reads_the_float_input_not_the_fake_quantized_edge(prepared):
    gm = _run(AddLora(targets="fc1"), copy_graph_module(prepared)).graph_module
    base = next(n for n in gm.graph.nodes if LORA_BASE_KEY in n.meta)
    down = next(n for n in gm.graph.nodes if n.meta.get(LORA_KEY) and n.target == aten.linear.default)
    assert base.args[0].op == "call_module" and isinstance(base.args[0].meta[QUANTIZER_KEY], tuple)
    assert down.args[0] is base.args[0].args[0]  # x itself, before fq_x__linear


def test_zero_b_leaves_outputs_bit_identical(prepared, batch):
    expected = prepared(batch)
    gm = _run(AddLora(r=8, alpha=16, targets=r".*"), copy_graph_module(prepared)).graph_module
    # B = 0: the adapter adds exactly +0.0 to every output of every linear.
    assert torch.equal(gm(batch), expected)


def test_only_adapters_get_gradients(prepared, batch):
    gm = _run(AddLora(r=4, targets=r"fc2|head"), copy_graph_module(prepared)).graph_module
    qgraph.train_mode(gm)
    gm(batch).square().mean().backward()
    for name, p in gm.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B = 0 at init: dL/dA = 0 but dL/dB is not, so the adapter starts to learn.
    assert gm.lora_fc2.lora_B.grad.abs().sum() > 0


def test_second_run_changes_nothing_and_shared_module_gets_one_adapter(batch):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    gm = qgraph.capture(Twice(), (batch,))
    first = _run(AddLora(targets="fc"), gm)
    assert first.modified
    assert sum(isinstance(m, LoraAdapter) for m in gm.modules()) == 1
    assert count_ops(gm)[aten.add.Tensor] == 2  # one adapter, used at both calls
    second = _run(AddLora(targets="fc"), gm)
    assert not second.modified


def test_no_match_names_the_linears(prepared):
    with pytest.raises(ConfigError, match=r"matches no linear.*'fc1', 'fc2', 'head'"):
        AddLora(targets="attn")(copy_graph_module(prepared))
    with pytest.raises(ConfigError, match="positive int"):
        AddLora(r=0)
    with pytest.raises(ConfigError, match="regular expression"):
        AddLora(targets="(")


def test_dropout_follows_train_and_eval(prepared):
    gm = add_lora(prepared, targets="head", dropout=0.1)
    drop = next(n for n in gm.graph.nodes if n.target == aten.dropout.default)
    assert drop.meta[LORA_KEY] and drop.args[2] is False  # prepared was in eval mode
    gm.train()
    assert drop.args[2] is True


def test_train_ranges_keeps_learnable_ranges_trainable(batch):
    default = xnnpack_scheme(is_qat=True)
    scheme = QuantScheme(default.activation, default.weight.with_(learnable=True))
    prepared = qgraph.prepare_qat(Mlp(), (batch,), config=qgraph.QConfig(scheme=scheme))
    frozen = _run(AddLora(targets="head"), copy_graph_module(prepared)).graph_module
    trained = _run(AddLora(targets="head", train_ranges=True), prepared).graph_module
    name = "fq_head_weight__linear_2"
    assert isinstance(trained.get_submodule(name), LearnableFakeQuantize)
    assert not frozen.get_submodule(name).scale.requires_grad
    assert trained.get_submodule(name).scale.requires_grad
    assert not trained.head.weight.requires_grad


def test_inits(prepared):
    r = 16
    kaiming = _run(AddLora(r=r, targets="fc2"), copy_graph_module(prepared)).graph_module.lora_fc2.lora_A
    normal = _run(AddLora(r=r, init="normal", targets="fc2"), copy_graph_module(prepared)).graph_module.lora_fc2.lora_A
    # kaiming_uniform(a=√5) is U(-1/√in, 1/√in) (nn.Linear's init); normal has std 1/r.
    assert kaiming.abs().max() <= 1 / 64**0.5
    assert abs(normal.std().item() - 1 / r) < 0.2 / r  # 1,024 samples: std within ~5 % (4σ)


def test_fake_quant_merged_puts_the_update_under_the_weight_quantizer(prepared, batch):
    expected = prepared(batch)
    gm = copy_graph_module(prepared)
    before = count_ops(gm)
    gm = _run(AddLora(r=4, targets=r"fc\d", fake_quant_merged=True), gm).graph_module
    after = count_ops(gm)
    assert after[aten.mm.default] == before[aten.mm.default] + 2
    assert after[aten.add.Tensor] == before[aten.add.Tensor] + 2
    assert after[aten.linear.default] == before[aten.linear.default]  # no parallel path
    for base in (n for n in gm.graph.nodes if LORA_BASE_KEY in n.meta):
        fq = base.args[1]
        assert fq.op == "call_module" and fq.args[0].target == aten.add.Tensor  # fq_w(W + s·BA)
    assert torch.equal(gm(batch), expected)  # B = 0: W + 0 is W, bit for bit
    qgraph.train_mode(gm)
    gm(batch).square().mean().backward()
    assert gm.lora_fc1.lora_B.grad.abs().sum() > 0  # through the weight quantizer's STE
    with pytest.raises(ConfigError, match="dropout"):
        AddLora(dropout=0.1, fake_quant_merged=True)
