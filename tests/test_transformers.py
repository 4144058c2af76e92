"""Transformer encoders on both backends: PTQ and QAT quantize ≥ 95 % of the linear MACs.

Two models, random weights, no downloads:

* ``torch.nn.TransformerEncoder`` (2 layers, d_model 64, 4 heads, batch first): attention
  runs as ``scaled_dot_product_attention``, so its matmuls are inside one op that stays
  float; every projection and feed-forward layer is a linear.
* ``transformers`` DistilBERT sequence classifier from a small config with
  ``attn_implementation="eager"``: attention as explicit ``matmul → softmax → matmul``, so
  the x86 backend's matmul rule quantizes both attention matmuls.

Both export with ``torch.export`` as they are (DistilBERT also with "sdpa"; eager is used
because it shows the matmul rule). Layer norm, softmax and GELU have no rule on either
backend: they run in float between quantized neighbours — their inputs are dequantized and
their outputs quantized again before the next integer op.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qgraph
from qgraph.core.graph import is_op
from qgraph.core.meta import ANNOTATION_KEY
from qgraph.core.opsets import DEQUANTIZE_OPS, QUANTIZE_OPS
from qgraph.ops.stochastic_depth import EVAL_IDENTITY_OPS
from qgraph.tools.coverage import coverage

aten = torch.ops.aten
SEQ, DIM = 16, 64
FLOAT_OPS = frozenset({aten.layer_norm.default, aten.softmax.int, aten._softmax.default})
PASS_THROUGH = EVAL_IDENTITY_OPS | {
    aten.view.default,
    aten.reshape.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.select.int,
    aten.slice.Tensor,
}


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` as a user would build it (dropout 0.1 in attention too)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=DIM, nhead=4, dim_feedforward=2 * DIM, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x)


def build(name: str, attention: str = "eager") -> tuple[nn.Module, callable]:
    """The model and a function that draws a batch of inputs for it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "encoder":
        return Encoder(), lambda n: torch.randn(n, SEQ, DIM, generator=g)
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=1000,
        dim=DIM,
        n_layers=2,
        n_heads=4,
        hidden_dim=2 * DIM,
        max_position_embeddings=SEQ,
        num_labels=3,
        attn_implementation=attention,
    )
    return DistilBertForSequenceClassification(config), lambda n: torch.randint(0, 1000, (n, SEQ), generator=g)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_distilbert_exports_with_either_attention(attention):
    model, draw = build("distilbert", attention)
    gm = qgraph.capture(model.eval(), (draw(2),))
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    sdpa = aten.scaled_dot_product_attention.default
    assert (sdpa in ops) == (attention == "sdpa") and (aten.matmul.default in ops) == (attention == "eager")


def _out(y):
    return y.logits if hasattr(y, "logits") else y


CASES = [
    (model, backend, mode)
    for model in ("encoder", "distilbert")
    for backend in ("xnnpack", "x86")
    for mode in ("ptq", "qat")
]
FAST = {("encoder", "x86", "qat"), ("encoder", "xnnpack", "ptq"), ("distilbert", "x86", "ptq"), ("distilbert", "xnnpack", "qat")}
"""Each model, backend and mode at least once in CI; the rest with ``-m slow``."""


def _params(cases) -> list:
    """``cases`` as pytest params: the id ``model-backend-mode``; cases outside FAST are slow."""
    return [pytest.param(c, id="-".join(c), marks=() if c in FAST else (pytest.mark.slow,)) for c in cases]


def _only(predicate):
    """Run a test on the flows where ``predicate(model, backend, mode)`` holds, and no others."""
    return pytest.mark.parametrize("flow", _params([c for c in CASES if predicate(*c)]), indirect=True)


@pytest.fixture(scope="module", params=_params(CASES))
def flow(request):
    name, backend, mode = request.param
    model, draw = build(name)
    x = draw(4)
    if mode == "qat":
        prepared = qgraph.prepare_qat(model.train(), (x,), backend=backend)
        opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
        for batch in (x, x[:3]):
            loss = _out(prepared(batch)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        prepared.eval()
    else:
        prepared = qgraph.prepare_ptq(model.eval(), (x,), backend=backend)
        qgraph.calibrate(prepared, [draw(4) for _ in range(4)], progress=False)
    converted = qgraph.convert(prepared)
    return name, backend, mode, model.eval(), prepared, converted, draw(8)


def test_at_least_95_percent_of_linear_macs_are_quantized(flow):
    name, backend, mode, _, _, converted, _ = flow
    layers = [layer for layer in coverage(converted).layers if layer.op == "linear"]
    share = sum(la.macs for la in layers if la.quantized) / sum(la.macs for la in layers)
    # Per layer: in_proj, out_proj and two feed-forward (encoder) or q, k, v, out and two
    # feed-forward (DistilBERT, plus pre-classifier and classifier).
    assert len(layers) == (8 if name == "encoder" else 14)
    assert share >= 0.95, coverage(converted).to_text()


# x86 DistilBERT only: the encoder's attention is one scaled_dot_product_attention op (no
# matmul to quantize), and XNNPACK's rules have no matmul of two activations.
@_only(lambda model, backend, mode: (model, backend) == ("distilbert", "x86"))
def test_x86_quantizes_the_attention_matmuls(flow):
    name, backend, _, _, prepared, converted, _ = flow
    matmuls = [n for n in converted.graph.nodes if is_op(n, {aten.matmul.default, aten.bmm.default})]
    assert len(matmuls) == 4  # scores and context, two layers
    assert all(is_op(a, DEQUANTIZE_OPS) for n in matmuls for a in n.args[:2])


def _reaches_quantize(node: torch.fx.Node, depth: int = 4) -> bool:
    """Whether a quantize follows ``node``, directly or through shape ops and dropout."""
    for user in node.users:
        if is_op(user, QUANTIZE_OPS) or (depth and is_op(user, PASS_THROUGH) and _reaches_quantize(user, depth - 1)):
            return True
    return False


def test_layer_norm_and_softmax_stay_float_between_quantized_neighbours(flow):
    name, backend, _, _, prepared, converted, _ = flow
    assert not any(ANNOTATION_KEY in n.meta for n in prepared.graph.nodes if is_op(n, FLOAT_OPS))
    # Softmax feeds the context matmul, an integer op only where the backend quantizes
    # matmuls of two activations (x86); layer norms feed linears on both backends.
    checked = FLOAT_OPS if backend == "x86" else {aten.layer_norm.default}
    float_nodes = [n for n in converted.graph.nodes if is_op(n, checked)]
    assert float_nodes
    # Every one of them feeds an integer op, except the encoder's last layer norm (the
    # model's output).
    fed = [n for n in float_nodes if _reaches_quantize(n)]
    last = [n for n in float_nodes if not n.users or any(u.op == "output" for u in n.users)]
    assert len(fed) + len(last) == len(float_nodes), [n.name for n in float_nodes if n not in fed + last]


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref - test).double().square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.double().square().sum().item() / noise)


def test_quantized_model_is_what_was_trained_or_calibrated(flow, record_property):
    name, backend, mode, model, prepared, converted, x = flow
    with torch.no_grad():
        q = _out(converted(x))
        if mode == "qat":
            # Eval fake-quant (dropout off, attention dropout_p back to 0) is the converted
            # model: the same qparams on the same float ops.
            fq = _out(prepared(x))
            assert torch.equal(_out(prepared(x)), fq)  # deterministic in eval
            # Identical but where fake_quantize and quantize → dequantize round a tie
            # differently (one step of one activation, diluted by the layers after it).
            assert (fq == q).float().mean().item() >= 0.99
            assert (fq - q).abs().max().item() <= 0.01 * q.abs().max().item()
        else:
            db = _sqnr_db(_out(model(x)), q)
            record_property("sqnr_db", round(db, 1))
            # An 8-bit (x86: 7-bit weight) model of this size keeps ~20 dB or more; a wrong
            # scale or a collapsed activation gives ≤ 0 dB.
            assert db >= 12.0


# Only nn.TransformerEncoder captured in training mode (QAT) holds
# scaled_dot_product_attention(dropout_p=0.1); DistilBERT here is eager attention.
@_only(lambda model, backend, mode: (model, mode) == ("encoder", "qat"))
def test_attention_dropout_follows_train_and_eval(flow):
    """A training capture records attention dropout as ``dropout_p=0.1``: eval sets 0, train restores it."""
    name, _, mode, _, prepared, _, _ = flow

    def probabilities():
        return [n.args[4] for n in prepared.graph.nodes if n.target == aten.scaled_dot_product_attention.default]

    assert probabilities() == [0.0, 0.0]
    prepared.train()
    assert probabilities() == [pytest.approx(0.1)] * 2
    prepared.eval()
    assert probabilities() == [0.0, 0.0]
