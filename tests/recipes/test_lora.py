"""LoRA with quantization in the loop, end to end: add → train → merge or keep → export."""

from __future__ import annotations

import pytest
import torch

import qgraph
from qgraph.core.errors import ConfigError
from qgraph.passes.lora.adapter import LoraAdapter
from qgraph.recipes.lora import add_lora, has_lora, lora_parameters, merge_lora
from qgraph.recipes.lowbit import int8_dynamic_int4_weight
from tests.passes.lora.test_add_lora import Mlp


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    return x, torch.tanh(x[:, :8] * 2)  # a target the random Mlp does not fit


def _tuned(config: qgraph.QConfig | None = None, steps: int = 40) -> tuple[torch.fx.GraphModule, list[float]]:
    torch.manual_seed(0)
    x, y = _data()
    prepared = qgraph.prepare_qat(Mlp().train(), (x,), config=config)
    model = add_lora(prepared, r=4, alpha=8, targets=".*")
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return qgraph.eval_mode(model), losses


@pytest.fixture(scope="module")
def static_tuned() -> tuple[torch.fx.GraphModule, list[float]]:
    return _tuned()


def test_adapters_train_and_leave_their_inputs_alone(static_tuned):
    x, _ = _data()
    prepared = qgraph.prepare_qat(Mlp(), (x,))
    model, losses = static_tuned
    assert losses[-1] < 0.5 * losses[0]  # adapters alone fit the target (base frozen)
    assert not has_lora(prepared) and has_lora(model)
    assert len(lora_parameters(model)) == 6 and all(p.requires_grad for p in lora_parameters(model))
    merged = merge_lora(model)
    assert has_lora(model) and not has_lora(merged)  # merge works on a copy
    with pytest.raises(ConfigError, match="add adapters after"):
        qgraph.prepare_qat(model, (x,))
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        merge_lora(prepared)
    prepared(x)  # observe once: convert needs ranges
    with pytest.raises(ConfigError, match="not a converted one"):
        add_lora(qgraph.convert(prepared))


def test_static_int8_unmerged_exports_onnx_and_refuses_pte(static_tuned, tmp_path):
    model, _ = static_tuned
    x, _ = _data(8, seed=1)
    unmerged = qgraph.convert(model)
    assert sum(isinstance(m, LoraAdapter) for m in unmerged.modules()) == 3
    path = qgraph.export_onnx(unmerged, (x,), tmp_path / "lora.onnx")
    got = torch.as_tensor(qgraph.load_onnx(path, optimize=False)(x))
    expected = unmerged(x)
    step = max(m for n, m in _output_scales(unmerged))
    # Plain QDQ in ONNX Runtime rounds like the reference: at most one output step apart.
    assert (got - expected).abs().max() <= step * 1.01
    with pytest.raises(ConfigError, match="unmerged LoRA adapter and a statically quantized input"):
        qgraph.export_pte(unmerged, (x,), tmp_path / "lora.pte")
    merged = qgraph.convert(merge_lora(model))
    qgraph.export_pte(merged, (x,), tmp_path / "merged.pte")
    torch.testing.assert_close(qgraph.load_pte(tmp_path / "merged.pte")(x), merged(x), rtol=0, atol=step * 1.01)


def _output_scales(gm: torch.fx.GraphModule):
    from qgraph.ops.qdq import qd

    for node in gm.graph.nodes:
        if node.target == qd.dequantize_per_tensor.default and isinstance(node.args[1], float):
            yield node.name, node.args[1]


def test_8da4w_unmerged_pte_matches_converted(tmp_path):
    config = qgraph.QConfig(scheme=int8_dynamic_int4_weight(group_size=32))
    model, losses = _tuned(config, steps=20)
    assert losses[-1] < losses[0]
    x, _ = _data(4, seed=1)
    unmerged = qgraph.convert(model)
    torch.testing.assert_close(unmerged(x), model(x), rtol=0, atol=1e-6)  # same ops, same order
    report = qgraph.export_pte(unmerged, (x,), tmp_path / "lora.pte")
    assert report.delegated["aten_linear_default"] == 3 + 6  # base linears and both adapter linears
    assert report.delegated["quantized_decomposed_dequantize_per_channel_group_default"] == 3  # int4 weights
    # XNNPACK's qd8-qb4w kernels compute the same int8 products; float rounding of the dequantized
    # sums and of the float adapter path differs by a few ulps of outputs of size ~1.
    torch.testing.assert_close(qgraph.load_pte(tmp_path / "lora.pte")(x), unmerged(x), rtol=0, atol=1e-5)


def test_learned_group_scales_train_with_the_adapters_and_convert_exactly():
    """8da4w with LSQ ranges: ``train_ranges`` keeps the int4 group scales trainable and
    ``include_ranges`` hands them to the optimizer with the adapters; the base weights stay
    as they were; convert computes what eval does."""
    from qgraph.observers.learnable import LearnableFakeQuantize

    torch.manual_seed(0)
    x, y = _data()
    scheme = int8_dynamic_int4_weight(32).with_learnable_ranges()
    prepared = qgraph.prepare_qat(Mlp().train(), (x,), config=qgraph.QConfig(scheme=scheme))
    model = add_lora(prepared, r=4, alpha=8, targets=".*", train_ranges=True)
    model(x)  # the first batch sets the learned scales
    ranges = [m for m in model.modules() if isinstance(m, LearnableFakeQuantize)]
    params = lora_parameters(model, include_ranges=True)
    assert len(params) == len(lora_parameters(model)) + len(ranges) == 6 + 3  # one weight grid per linear
    base = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") and "lora" not in k}
    scales = [m.scale.detach().clone() for m in ranges]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(5):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    assert all(not torch.equal(a, m.scale.detach()) for a, m in zip(scales, ranges))
    model = qgraph.eval_mode(model)
    assert torch.equal(qgraph.convert(model)(x), model(x))
