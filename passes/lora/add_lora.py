"""Add LoRA: a trainable low-rank float path next to chosen linear layers.

For a linear ``y = x Wᵀ + b`` chosen by module name, LoRA (Hu et al., 2021) trains only a
rank-``r`` update of the weight::

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,      A: r × in,  B: out × r,  s = alpha / r

``A`` starts random (``kaiming``: the uniform init of ``nn.Linear``, as PEFT does;
``normal``: N(0, 1/r²)), ``B`` starts at zero, so the model computes exactly what it
computed before until training moves ``B``. ``s = alpha / r`` keeps the size of the update
comparable across ranks, so a learning rate tuned at one rank carries over.

In a prepared (QAT) graph the base linear keeps its quantizers: it reads ``fq_w(W)`` and the
fake-quantized input, whatever weight spec the backend or config put there (int8
per-channel, int4 per-group, learnable ranges). The adapter reads the *float* input — the
value before the linear's own input edge quantizer, as torchtune's QAT-LoRA linear does —
and adds its float output to the linear's output, before any output quantizer or fused
activation sees it. Nodes added::

    x ─(edge fq)─► linear(·, fq_w(W), b) ──► add ──► (users of the linear)
    └─[dropout]─► linear(·, A) ─► linear(·, B) ─► mul(·, s) ─┘

``fake_quant_merged=True`` trains the form a merge produces instead: the update goes into
weight space and the base weight's quantizer sees the merged weight,
``linear(x, fq_w(W + s · B A), b)``, so training sees exactly ``Q(W + sBA)`` — what
:mod:`qgraph.passes.lora.merge_lora` and ``convert`` will run — at the price of a weight-sized
``B @ A`` per step (and no unmerged form: such a graph is meant to be merged).

Every parameter of the graph but the adapters is frozen (``requires_grad=False``);
``train_ranges=True`` leaves the parameters of quantizer modules (learnable ranges)
trainable. A module called several times (a shared linear) gets one adapter. Linears that
already have an adapter are left alone, so a second run over the same targets changes
nothing (``modified=False``).
"""

from __future__ import annotations

import re

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from qgraph.core.errors import ConfigError
from qgraph.core.graph import copy_provenance, free_attr_name, get_constant, is_op, module_path
from qgraph.core.meta import LORA_BASE_KEY, LORA_KEY, QUANTIZER_KEY, REFUSALS_KEY, Refusal, RefusalKind
from qgraph.core.opsets import DEQUANTIZE_OPS, LINEAR_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.lora.adapter import LoraAdapter, is_quantizer_call
from qgraph.quant.config import _matches_path

aten = torch.ops.aten

LORA_REFUSAL = Refusal("lora", "LoRA adapter: a float path by design (merge it to quantize it)", RefusalKind.LORA)




class AddLora(Pass):
    """Add rank-``r`` adapters to the linears whose module path matches ``targets``.

    ``targets`` is a regular expression matched like ``QConfig.set_module_name``: in full
    against the dotted path of the ``nn.Linear`` (``model.layers.0.self_attn.q_proj``) or of
    a module that contains it (``layers\\.0`` adapts every linear of layer 0).
    """

    name = "add_lora"

    def __init__(self, r: int = 8, alpha: float = 16.0, targets: str = r".*", dropout: float = 0.0,
                 init: str = "kaiming", seed: int = 0, train_ranges: bool = False,
                 fake_quant_merged: bool = False) -> None:
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"add_lora: r={r!r} must be a positive int (the adapter rank)")
        if alpha <= 0:
            raise ConfigError(f"add_lora: alpha={alpha!r} must be positive (scaling = alpha / r)")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"add_lora: dropout={dropout!r} must be in [0, 1)")
        if fake_quant_merged and dropout:
            raise ConfigError("add_lora: dropout acts on the adapter's input, which fake_quant_merged=True "
                              "does not have (the update lives in weight space); use one or the other")
        if init not in ("kaiming", "normal"):
            raise ConfigError(f"add_lora: init={init!r} must be 'kaiming' or 'normal'")
        try:
            re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"add_lora: targets={targets!r} is not a regular expression: {exc}") from exc
        self.r, self.alpha, self.targets, self.dropout = r, float(alpha), targets, dropout
        self.init, self.seed, self.train_ranges = init, seed, train_ranges
        self.fake_quant_merged = fake_quant_merged

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        linears = [n for n in gm.graph.nodes if is_op(n, LINEAR_OPS) and LORA_KEY not in n.meta]
        chosen = [n for n in linears if module_path(n) and _matches_path(self.targets, module_path(n))]
        if not chosen:
            names = sorted({module_path(n) for n in linears if module_path(n)})
            raise ConfigError(
                f"add_lora: targets={self.targets!r} matches no linear layer; the graph's linears are "
                f"{names[:40]}{' ...' if len(names) > 40 else ''}. Pass a regular expression that "
                "fully matches one of these paths (or a module containing them)."
            )
        registry: dict[str, str] = dict(gm.meta.get(LORA_KEY, {}))  # a copy: graph copies share meta values
        generator = torch.Generator().manual_seed(self.seed)
        added = 0
        for lin in chosen:
            if LORA_BASE_KEY in lin.meta:
                continue  # adapted by an earlier run
            path = module_path(lin)
            weight = _weight_value(gm, lin)
            if path not in registry:
                out_features, in_features = weight.shape
                name = free_attr_name(gm, "lora_" + re.sub(r"\W", "_", path))
                gm.add_submodule(name, LoraAdapter(in_features, out_features, self.r, self.alpha, self.init,
                                                   generator, weight, path))
                registry[path] = name
            self._insert(gm, lin, registry[path])
            added += 1
        gm.meta[LORA_KEY] = registry
        self._freeze_base(gm)
        return PassResult(gm, added > 0)

    def _insert(self, gm: torch.fx.GraphModule, lin: torch.fx.Node, name: str) -> None:
        adapter = gm.get_submodule(name)
        graph = gm.graph
        mode = _graph_fake_mode(graph)
        created: list[torch.fx.Node] = []

        def make(op, args):
            node = graph.call_function(op, args)
            node.meta["val"] = _fake_value(mode, op, args)
            created.append(node)
            return node

        if self.fake_quant_merged:
            # linear(x, fq_w(W + s·(B @ A)), b): the weight quantizer (or the linear) reads the sum.
            reader = lin.args[1] if is_quantizer_call(lin.args[1]) else lin
            weight = reader.args[0] if reader is not lin else lin.args[1]
            with graph.inserting_before(reader):
                a = _get_attr(graph, f"{name}.lora_A", adapter.lora_A, created)
                b = _get_attr(graph, f"{name}.lora_B", adapter.lora_B, created)
                scaled = make(aten.mul.Tensor, (make(aten.mm.default, (b, a)), adapter.scaling))
                out = make(aten.add.Tensor, (weight, scaled))
            reader.replace_input_with(weight, out)
        else:
            x = _float_input(lin)
            with graph.inserting_before(lin.next):
                if self.dropout > 0:
                    x = make(aten.dropout.default, (x, self.dropout, gm.training))
                a = _get_attr(graph, f"{name}.lora_A", adapter.lora_A, created)
                b = _get_attr(graph, f"{name}.lora_B", adapter.lora_B, created)
                down = make(aten.linear.default, (x, a))
                up = make(aten.linear.default, (down, b))
                scaled = make(aten.mul.Tensor, (up, adapter.scaling))
                out = make(aten.add.Tensor, (lin, scaled))
            lin.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
            for node in (down, up):
                node.meta[REFUSALS_KEY] = [LORA_REFUSAL]  # coverage() lists them as float, with this reason
        for node in created:
            copy_provenance(node, lin, self.name)
            node.meta[LORA_KEY] = name
        lin.meta[LORA_BASE_KEY] = name

    def _freeze_base(self, gm: torch.fx.GraphModule) -> None:
        adapters = {id(p) for m in gm.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
        ranges: set[int] = set()
        if self.train_ranges:
            for node in gm.graph.nodes:
                if node.op == "call_module" and QUANTIZER_KEY in node.meta:
                    ranges |= {id(p) for p in gm.get_submodule(str(node.target)).parameters()}
        for p in gm.parameters():
            p.requires_grad_(id(p) in adapters or id(p) in ranges)


def pte_blocker(gm: torch.fx.GraphModule) -> str | None:
    """Why ExecuTorch's XNNPACK lowering cannot take this converted graph's adapters, or None.

    With *static* activation quantization (int8 W8A8) an unmerged adapter puts a float
    ``add`` between the integer linear and the requantize of its output, so the linear no
    longer matches XNNPACK's ``dq → linear → q`` pattern; ExecuTorch 1.5's lowering then
    delegates it as a float ``addmm`` on dequantized weights whose scales it passes as
    run-time inputs, and the ``.pte`` computes wrong values (off by ~10³ on a toy model).
    Dynamic activations (8da4w, per-token int8) keep a float linear output anyway, so their
    adapters lower fine; so do merged adapters and ONNX.
    """
    for node in gm.graph.nodes:
        if is_op(node, {aten.mm.default}) and LORA_KEY in node.meta:
            return (
                f"adapter '{node.meta[LORA_KEY]}' was trained with fake_quant_merged=True: its update lives in "
                "weight space, so the weight would be quantized at run time; merge it first "
                "(qgraph.convert(qgraph.merge_lora(model)))"
            )
        if LORA_BASE_KEY in node.meta and is_op(node.args[0], DEQUANTIZE_OPS):
            return (
                f"linear '{node.name}' (module '{module_path(node)}') has an unmerged LoRA adapter and a "
                "statically quantized input; ExecuTorch's XNNPACK lowering miscomputes that form. Merge the "
                "adapters first (qgraph.convert(qgraph.merge_lora(model))), use a dynamic-activation scheme "
                "(8da4w), or export ONNX"
            )
    return None


def _float_input(lin: torch.fx.Node) -> torch.fx.Node:
    """The linear's input before its own input edge quantizer (an output quantizer is kept:
    every reader of that producer sees the quantized value, the adapter too)."""
    x = lin.args[0]
    point = x.meta.get(QUANTIZER_KEY) if x.op == "call_module" else None
    if isinstance(point, tuple) and point[1] == lin.name:
        return x.args[0]
    return x


def _weight_value(gm: torch.fx.GraphModule, lin: torch.fx.Node) -> torch.Tensor:
    """The float weight a linear reads, through its weight quantizer if it has one."""
    w = lin.args[1]
    if is_quantizer_call(w):
        w = w.args[0]
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        raise ConfigError(
            f"add_lora: the weight of linear '{lin.name}' (module '{module_path(lin)}') is not a parameter "
            "of the graph; LoRA adapts linears with a stored weight only — leave this module out of targets"
        )
    return get_constant(gm, w)


def _get_attr(graph: torch.fx.Graph, target: str, value: torch.Tensor, created: list) -> torch.fx.Node:
    node = graph.get_attr(target)
    node.meta["val"] = value.detach()
    created.append(node)
    return node


def _graph_fake_mode(graph: torch.fx.Graph):
    """The fake mode of the graph's recorded values (None for a graph without them)."""
    return detect_fake_mode([n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), FakeTensor)])


def _fake_value(mode, op, args) -> torch.Tensor | None:
    """The node's ``meta['val']``: the op run on the inputs' fake values (symbolic batch kept)."""
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
    if mode is None or any(isinstance(a, torch.fx.Node) and v is None for a, v in zip(args, vals)):
        return None
    with mode:
        fakes = [mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v for v in vals]
        return op(*fakes)
