"""Small LLMs: the stdlib data set, the Llama decoder, 8da4w / int4 / embedding schemes, QAT,
convert, ``.pte`` and ONNX — on a tiny random model — and the acceptance table (slow)."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

import qgraph
from qgraph.backends.executorch.lowbit import UseEmbeddingKernels, pack_int4
from qgraph.core.errors import ConfigError
from qgraph.core.meta import ANNOTATION_KEY, REFUSALS_KEY
from qgraph.llm import train as llm_train
from qgraph.models import pydata
from qgraph.models.llama import Llama, LlamaConfig, greedy_decode
from qgraph.observers.base import DynamicQuantizer, FakeQuantize
from qgraph.ops.qdq import qd
from qgraph.quant.qparams import fake_quantize, qparams_from_range
from qgraph.quant.rules import QuantScheme
from qgraph.quant.specs import PerGroup, PerToken, QuantSpec
from qgraph.recipes.lowbit import (
    embedding_weight_only,
    int4_weight_only,
    int4_weight_spec,
    int8_dynamic_int4_weight,
    llm_config,
)
from tests.conftest import count_ops

aten = torch.ops.aten
TINY = LlamaConfig(vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=16)
N_LINEARS = 8  # wq wk wv wo w1 w2 w3 + output


def tiny_model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(TINY).eval()
    with torch.no_grad():  # larger weights than the init, so int4 rounding is visible in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, TINY.max_seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def qat_tiny():
    """A tiny Llama through prepare_qat (8da4w, group 32, int4 embedding) → 3 steps → convert."""
    model, x = tiny_model(), tokens()
    prepared = qgraph.prepare_qat(model, (x,), config=llm_config(32, embedding_bits=4))
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    prepared.train()
    losses = []
    for step in range(3):
        logits = prepared(tokens(4, seed=10 + step))
        loss = llm_train.lm_loss(logits[:, :-1], tokens(4, seed=10 + step)[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    prepared.eval()
    return model, prepared, qgraph.convert(prepared), x, losses


# ------------------------------------------------------------------------------ data


def test_stdlib_split_is_by_module_deterministic_and_disjoint():
    files = pydata.stdlib_files()
    assert len(files) > 300
    assert not [f for f in files if {"site-packages", "test"} & set(f.parts[:-1])]
    held = [f for f in files if pydata.is_heldout(f)]
    assert 0.03 < len(held) / len(files) < 0.2
    train, heldout = pydata.load_split("train"), pydata.load_split("heldout")
    assert len(train) > 5_000_000 and len(heldout) > 100_000
    x1, y1 = pydata.eval_windows(heldout, 8, 32)
    x2, _ = pydata.eval_windows(heldout, 8, 32)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    (a, _), (b, _) = next(pydata.train_batches(train, 4, 32, 1, seed=3)), next(pydata.train_batches(train, 4, 32, 1, seed=3))
    assert torch.equal(a, b)
    assert pydata.decode(pydata.encode("def f(x):\n")) == "def f(x):\n"


# ------------------------------------------------------------------------------ model


def test_llama_captures_with_dynamic_batch_and_is_causal():
    model, x = tiny_model(), tokens(3)
    gm = qgraph.capture(model, (x[:2],))
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)  # batch 3 through a graph captured at batch 2
        changed = x.clone()
        changed[:, 10] = (changed[:, 10] + 1) % 256
        # Causal: positions before 10 do not see the change (what padded greedy decoding relies on).
        assert torch.equal(model(changed)[:, :10], model(x)[:, :10])
        assert not torch.equal(model(changed)[:, 10:], model(x)[:, 10:])


def test_greedy_decode_pads_and_slides_the_window():
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3])
    got = greedy_decode(model, prompt, 20, TINY.max_seq_len)  # 23 > 16: the window slides
    seq = prompt.tolist()
    with torch.no_grad():
        for _ in range(20):  # reference: the unpadded window of the last 16 tokens
            window = torch.tensor([seq[-TINY.max_seq_len :]])
            seq.append(int(model(window)[0, -1].argmax()))
    assert got.tolist() == seq[3:]


# ------------------------------------------------------------------------------ specs


def test_lowbit_schemes_are_validated():
    scheme = int8_dynamic_int4_weight(64)
    assert scheme.weight.granularity == PerGroup(64) and (scheme.weight.quant_min, scheme.weight.quant_max) == (-8, 7)
    assert scheme.activation.dynamic and isinstance(scheme.activation.granularity, PerToken)
    assert int4_weight_only(32).is_weight_only and not scheme.is_weight_only
    with pytest.raises(ConfigError, match="multiples of 32"):
        int8_dynamic_int4_weight(48)
    with pytest.raises(ConfigError, match="group_size"):
        PerGroup(1)
    with pytest.raises(ConfigError, match="8 or 4 bits"):
        embedding_weight_only(bits=2)
    with pytest.raises(ConfigError, match="per-group"):
        QuantScheme(activation=QuantSpec(granularity=PerGroup(32)), weight=int4_weight_spec(32))
    with pytest.raises(ConfigError, match="weight-only"):
        QuantScheme(activation=None, weight=int4_weight_spec(32), bias=QuantSpec(dtype=torch.int32, bits=32))
    with pytest.raises(ConfigError, match="scale_dtype"):
        QuantSpec(scale_dtype=torch.float64)


def test_per_group_qparams_and_fake_quant_follow_the_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 64, requires_grad=True)
    spec = int4_weight_spec(32)
    fq = FakeQuantize(spec)
    out = fq(w)
    assert fq.min_val.shape == (8, 2)  # [out, in / group]
    groups = w.detach().reshape(8, 2, 32)
    scale = (groups.abs().amax(-1) / 7.5).to(torch.bfloat16).float()  # stored as XNNPACK stores it
    s, zp = fq.qparams()
    assert torch.equal(s, scale) and not zp.any()
    expected = (torch.clamp(torch.round(groups / scale[..., None]), -8, 7) * scale[..., None]).reshape(8, 64)
    assert torch.equal(out, expected)
    out.sum().backward()
    # Straight-through: gradient 1 inside the range, 0 where a value was clamped (the group
    # maximum lands at 7.5 steps before bf16 rounding, and rounds to 8 > 7 on the positive side).
    clamped = torch.round(groups / scale[..., None]).reshape(8, 64) > 7
    assert torch.equal(w.grad, (~clamped).float())
    with pytest.raises(ConfigError, match="multiple of 32"):
        FakeQuantize(spec)(torch.randn(4, 48))


def test_bf16_scales_are_kept_in_float32_but_bf16_exact():
    spec = int4_weight_spec(32)
    scale, _ = qparams_from_range(-torch.rand(100), torch.rand(100), spec)
    assert scale.dtype == torch.float32 and torch.equal(scale, scale.to(torch.bfloat16).float())
    plain, _ = qparams_from_range(-torch.rand(100), torch.rand(100), spec.with_(scale_dtype=torch.float32))
    assert not torch.equal(plain, plain.to(torch.bfloat16).float())
    assert torch.equal(fake_quantize(torch.zeros(2, 32), *qparams_from_range(torch.zeros(2, 1), torch.zeros(2, 1), spec), spec),
                       torch.zeros(2, 32))


# ------------------------------------------------------------------------------ annotate


def test_8da4w_quantizes_every_linear_and_nothing_else(qat_tiny):
    _, prepared, _, _, _ = qat_tiny
    rules = {n.meta[ANNOTATION_KEY].rule for n in prepared.graph.nodes if ANNOTATION_KEY in n.meta}
    assert rules == {"linear", "embedding"}
    weights = [m for m in prepared.modules() if isinstance(m, FakeQuantize)]
    assert len(weights) == N_LINEARS + 1 and all(isinstance(m.spec.granularity, PerGroup) for m in weights)
    dynamic = [m for m in prepared.modules() if isinstance(m, DynamicQuantizer)]
    assert dynamic and all(isinstance(m.spec.granularity, PerToken) for m in dynamic)
    for node in prepared.graph.nodes:  # dynamic layers have float outputs: no output specs
        ann = node.meta.get(ANNOTATION_KEY)
        assert ann is None or ann.output is None


def test_group_size_that_does_not_divide_keeps_the_layer_float_and_says_why():
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(2, 96)
    with pytest.warns(UserWarning, match="96 input features are not a multiple of group size 64"):
        prepared = qgraph.prepare_ptq(model, (x,), config=qgraph.QConfig(scheme=int8_dynamic_int4_weight(64)))
    first, second = [n for n in prepared.graph.nodes if n.target == aten.linear.default]
    assert ANNOTATION_KEY not in first.meta and "group size 64" in str(first.meta[REFUSALS_KEY])
    assert ANNOTATION_KEY in second.meta


def test_embedding_is_quantized_only_by_a_weight_only_scheme():
    model, x = tiny_model(), tokens()
    for config, quantized in ((qgraph.QConfig(scheme=int8_dynamic_int4_weight(32)), False), (llm_config(32, 8), True)):
        prepared = qgraph.prepare_ptq(model, (x,), config=config)
        emb = next(n for n in prepared.graph.nodes if n.target == aten.embedding.default)
        assert (ANNOTATION_KEY in emb.meta) is quantized


# ------------------------------------------------------------------------------ QAT and convert


def test_qat_8da4w_trains_and_converts_to_the_ops_xnnpack_takes(qat_tiny):
    model, prepared, converted, x, losses = qat_tiny
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(prepared.output.weight, model.output.weight)  # the optimizer moved it
    ops = count_ops(converted)
    assert ops[aten.linear.default] == N_LINEARS
    assert ops[qd.dequantize_per_channel_group.default] == N_LINEARS + 1  # + the embedding table
    n_dynamic = ops[qd.choose_qparams_per_token_asymmetric.default]
    assert n_dynamic >= 1 and ops[qd.quantize_per_token.default] == n_dynamic
    assert ops[qd.dequantize_per_token.default] == N_LINEARS
    assert ops[qd.quantize_per_channel_group.default] == 0  # weights folded to integers
    for node in converted.graph.nodes:
        if node.target == qd.dequantize_per_channel_group.default:
            q, scale = (getattr(converted, a.target) for a in node.args[:2])
            assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
            assert scale.shape == (q.shape[0], q.shape[1] // 32)
        if node.target == aten.linear.default:  # every linear reads a per-token dequantize
            assert node.args[0].target == qd.dequantize_per_token.default
    assert not [n for n, p in converted.named_parameters() if p.dim() == 2]  # no float matrices left
    with torch.no_grad():
        # Fake-quant in eval mode runs the very ops convert emits (per-token qparams from the
        # same choose_qparams op, per-group weights with the same bf16 scales): equal.
        assert torch.equal(prepared(x), converted(x))
        err = (converted(x) - model(x)).abs().max()
    assert 0 < err < 0.5 * model(x).abs().max()  # int4 changes the logits, but not beyond recognition


def test_8da4w_pte_delegates_every_linear_and_matches_the_converted_graph(qat_tiny, tmp_path):
    _, _, converted, x, _ = qat_tiny
    report = qgraph.export_pte(converted, (x[:1],), tmp_path / "tiny.pte")
    assert not [op for op in report.not_delegated if "linear" in op or "per_token" in op]
    assert sum(n for op, n in report.delegated.items() if "linear" in op) == N_LINEARS
    assert report.not_delegated["quantized_decomposed_embedding_4bit_default"] == 1
    got, ref = qgraph.load_pte(report.path)(x[:1]), converted(x[:1]).detach()
    # XNNPACK computes the per-token range and x/scale in float32, the reference in float64:
    # an input value on a rounding tie can land one int8 step away, moving a few logits by a
    # fraction of a percent. Everything else is the same integer arithmetic: most logits agree
    # to float rounding and the argmax is unchanged.
    diff = (got - ref).abs()
    assert diff.max() <= 0.02 * ref.abs().max()
    assert (diff <= 1e-4 * ref.abs().max()).float().mean() >= 0.9
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_8da4w_onnx_has_int4_blocked_dequantize_and_runs_in_onnxruntime(qat_tiny, tmp_path):
    import onnxruntime as ort

    _, _, converted, x, _ = qat_tiny
    path = qgraph.export_onnx(converted, (x,), tmp_path / "tiny.onnx")
    m = onnx.load(path)
    assert next(o.version for o in m.opset_import if o.domain == "") == 21
    int4 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= N_LINEARS + 1
    blocked = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == N_LINEARS + 1
    ref = converted(x).detach()
    plain = qgraph.load_onnx(path, optimize=False)(x)
    # Same formulas as float math (per-token range, int4 blocks): only float32 rounding at
    # rounding ties separates them, as for the .pte.
    assert (plain - ref).abs().max() <= 0.02 * ref.abs().max()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("MatMulNBits") == N_LINEARS


def test_int4_weight_only_runs_in_onnxruntime_and_export_pte_refuses_it(tmp_path):
    model, x = tiny_model(), tokens()
    prepared = qgraph.prepare_ptq(model, (x,), config=llm_config(32, weight_only=True))
    converted = qgraph.convert(prepared)  # weights need no calibration: convert observes them
    ops = count_ops(converted)
    assert ops[qd.dequantize_per_channel_group.default] == N_LINEARS and not ops[qd.choose_qparams_per_token_asymmetric.default]
    path = qgraph.export_onnx(converted, (x,), tmp_path / "wo.onnx")
    # Weight-only: DequantizeLinear of int4 blocks and a float MatMul, the converted graph's
    # arithmetic exactly; only the order of float32 sums differs.
    assert torch.allclose(qgraph.load_onnx(path, optimize=False)(x), converted(x), atol=1e-4)
    with pytest.raises(ConfigError, match="export_onnx"):
        qgraph.export_pte(converted, (x[:1],), tmp_path / "wo.pte")


def test_use_embedding_kernels_replaces_dequantize_embedding_with_the_same_values():
    pytest.importorskip("executorch")  # the ops are ExecuTorch's
    for bits, op in ((4, qd.embedding_4bit.default), (8, qd.embedding_byte.default)):
        model = nn.Sequential(nn.Embedding(40, 64)).eval()
        idx = torch.randint(0, 40, (2, 5))
        prepared = qgraph.prepare_ptq(model, (idx,), config=qgraph.QConfig(scheme=embedding_weight_only(bits, 32)))
        converted = qgraph.convert(prepared)
        before = converted(idx)
        result = UseEmbeddingKernels()(converted)
        gm = result.graph_module
        gm.graph.lint()
        gm.recompile()
        assert result.modified and count_ops(gm)[op] == 1 and not count_ops(gm)[aten.embedding.default]
        assert torch.equal(gm(idx), before)  # the kernel dequantizes the same integers with the same scales
        assert not UseEmbeddingKernels()(gm).modified
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[(0 << 4) | 15, (8 << 4) | 7]]


# ------------------------------------------------------------------------------ training script


def test_checkpoint_is_trained_when_missing_and_reused_when_current(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    cfg, tc = TINY, llm_train.TrainConfig(steps=3, batch_size=2, warmup=1)
    model, record = llm_train.load_or_train(path, cfg, tc, progress=False)
    assert path.exists() and record["config"] == cfg.to_dict() and record["heldout_ppl"] > 1
    monkeypatch.setattr(llm_train, "train_fp32", lambda *a, **k: pytest.fail("retrained a current checkpoint"))
    again, _ = llm_train.load_or_train(path, cfg, tc, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    monkeypatch.undo()
    _, record = llm_train.load_or_train(path, cfg, llm_train.TrainConfig(steps=4, batch_size=2, warmup=1), progress=False)
    assert record["train"]["steps"] == 4  # a different training config makes the file stale
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # atomic: no temporary left behind


# ------------------------------------------------------------------------------ acceptance


@pytest.mark.slow
def test_llm_acceptance_table(tmp_path):
    """The README table's claims, measured: the checkpoint is regenerated when missing."""
    from qgraph.llm.table import run_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = run_table(tmp_path, progress=False)
    assert table.recovered >= 0.70
    assert abs(table.pte_vs_converted) <= 0.01
    assert table.decode_match
    assert table.size_ratio <= 0.35
    assert table.delegated_linears[0] == table.delegated_linears[1]
