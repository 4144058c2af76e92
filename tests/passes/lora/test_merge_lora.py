"""MergeLora: W' = W + (alpha/r)·B·A, adapter nodes gone, weight range re-observed."""

from __future__ import annotations

import torch
from torch import nn

import qgraph
from qgraph.backends.rules.xnnpack import xnnpack_scheme
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import LORA_KEY
from qgraph.observers.base import FakeQuantize
from qgraph.observers.learnable import LearnableFakeQuantize
from qgraph.passes.lora.adapter import LoraAdapter
from qgraph.passes.lora.add_lora import AddLora
from qgraph.passes.lora.merge_lora import MergeLora
from qgraph.quant.qparams import qparams_from_range
from qgraph.quant.rules import QuantScheme
from qgraph.recipes.lowbit import int8_dynamic_int4_weight
from tests.conftest import count_ops
from tests.passes.lora.test_add_lora import Mlp, _run, batch, prepared  # noqa: F401  (fixtures)

aten = torch.ops.aten


def _train_adapters(gm: torch.fx.GraphModule, seed: int = 0) -> torch.fx.GraphModule:
    """Give every adapter a non-zero B (what training does), so that merging is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, LoraAdapter):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return gm


def test_float_merge_equals_unmerged_within_fp32_rounding(batch):
    torch.manual_seed(0)
    captured = qgraph.capture(Mlp().eval(), (batch,))
    linears = count_ops(captured)[aten.linear.default]
    gm = _train_adapters(_run(AddLora(r=4, alpha=8, targets=".*"), captured).graph_module)
    unmerged = gm(batch)
    result = _run(MergeLora(), gm)
    merged = result.graph_module
    assert result.modified
    ops = count_ops(merged)
    assert ops[aten.linear.default] == linears and ops[aten.mul.Tensor] == 0 and ops[aten.add.Tensor] == 0
    assert not any(isinstance(m, LoraAdapter) for m in merged.modules())
    assert not any(LORA_KEY in n.meta for n in merged.graph.nodes) and LORA_KEY not in merged.meta
    # x(W + sBA)ᵀ and xWᵀ + s(xAᵀ)Bᵀ sum the same products in another order: fp32 rounding
    # of sums of ≤ 64 terms of size ~1 is a few 1e-7 per layer; 1e-5 leaves room for three
    # layers and still fails on any real mistake (a missing s, BA vs AB: errors ≥ 1e-2).
    torch.testing.assert_close(merged(batch), unmerged, rtol=0, atol=1e-5)
    assert not _run(MergeLora(), merged).modified


def test_merged_weight_range_is_re_observed_and_converts(prepared, batch):
    gm = _train_adapters(_run(AddLora(r=4, alpha=8, targets="fc2"), copy_graph_module(prepared)).graph_module)
    delta = gm.lora_fc2.delta_weight().detach().clone()
    weight = gm.fc2.weight.detach().clone()
    fq = gm.get_submodule("fq_fc2_weight__linear_1")
    fq.freeze()  # a frozen range is re-observed anyway: it belongs to the old weight
    merged = _run(MergeLora(), gm).graph_module
    assert torch.equal(merged.fc2.weight, weight + delta)
    fq = merged.get_submodule("fq_fc2_weight__linear_1")
    assert isinstance(fq, FakeQuantize) and fq.observer_enabled.item() == 0 and not fq.training
    lo, hi = torch.aminmax(weight + delta, dim=1)  # per output channel
    assert torch.equal(fq.min_val, lo) and torch.equal(fq.max_val, hi)
    converted = qgraph.convert(merged)
    # convert uses the same qparams as eval-mode fake-quant: identical up to the float
    # association of dequantize-then-matmul (a few ulps).
    torch.testing.assert_close(converted(batch), qgraph.eval_mode(merged)(batch), rtol=0, atol=1e-5)


def test_tied_weight_is_copied_not_changed(batch):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32, bias=False)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight  # the second read must keep W

    torch.manual_seed(0)
    gm = qgraph.capture(Tied().eval(), (batch,))
    gm = _train_adapters(_run(AddLora(targets="fc"), gm).graph_module)
    original = gm.fc.weight.detach().clone()
    expected = gm(batch)
    merged = _run(MergeLora(), gm).graph_module
    assert torch.equal(merged.fc.weight, original)
    assert any(name.endswith("_lora_merged") for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(batch), expected, rtol=0, atol=1e-5)  # same bound as above


def test_int4_group_weight_and_learnable_scale_are_re_observed(batch):
    scheme = int8_dynamic_int4_weight(group_size=32)
    # Learnable ranges exist for per-tensor / per-channel specs: int8 per-channel on the head.
    learnable = QuantScheme(scheme.activation, xnnpack_scheme(is_qat=True).weight.with_(learnable=True))
    config = qgraph.QConfig(scheme=scheme).set_module_name("head", learnable)
    torch.manual_seed(0)
    prepared = qgraph.prepare_qat(Mlp(), (batch,), config=config)
    prepared(batch)
    gm = _train_adapters(_run(AddLora(r=4, alpha=8, targets="fc2|head"), prepared).graph_module)
    merged_weights = {name: (getattr(gm, name).weight + getattr(gm, f"lora_{name}").delta_weight()).detach()
                      for name in ("fc2", "head")}
    merged = _run(MergeLora(), gm).graph_module
    fc2 = merged.get_submodule("fq_fc2_weight__linear_1")
    lo, hi = torch.aminmax(merged_weights["fc2"].reshape(64, 2, 32), dim=-1)  # [out, in / 32] groups
    assert torch.equal(fc2.min_val, lo) and torch.equal(fc2.max_val, hi)
    head = merged.get_submodule("fq_head_weight__linear_2")
    assert isinstance(head, LearnableFakeQuantize)
    # A learned scale belongs to the old weight: it restarts from the merged weight's range.
    lo, hi = torch.aminmax(merged_weights["head"], dim=1)  # per output channel
    expected, _ = qparams_from_range(lo, hi, head.spec)
    torch.testing.assert_close(head.qparams()[0], expected, rtol=0, atol=0)


def test_fake_quant_merged_merge_changes_no_output(prepared, batch):
    gm = _run(AddLora(r=4, targets=".*", fake_quant_merged=True), copy_graph_module(prepared)).graph_module
    qgraph.train_mode(gm)
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = gm(batch).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gm(batch)  # observe the weights as they are after the last step
    expected = qgraph.eval_mode(gm)(batch)
    merged = _run(MergeLora(), gm).graph_module
    assert count_ops(merged)[aten.mm.default] == 0
    # The merge computes W + s·(B @ A) with the graph's own ops and re-observes that very
    # tensor: the same quantized weights, so bit-identical outputs.
    assert torch.equal(qgraph.eval_mode(merged)(batch), expected)
