"""Per-layer conformance of a runtime with the converted reference, inputs shared.

Why: end to end, a deep network's runtime output drifts from the reference by several
output steps even when every kernel is right: each layer may round a tie the other way
(one step), and the layers after it amplify that. To see each kernel's own error, each
layer of the reference must start from exactly the input the runtime's layer had.

How:

1. :func:`with_quantized_outputs` — the converted graph returns, besides its outputs, every
   activation quantize (``quantize_per_tensor`` with constant qparams: the boundaries
   between quantized layers). Exported and run, the program gives the runtime's integers
   at every boundary (:func:`codes`); adding outputs changes none of the kernels.
2. :func:`cut_at_quantizers` — the converted graph *cut* at those boundaries: each
   quantize's users read a new graph input instead, and the quantizes are the outputs.
   Fed the runtime's integers at every cut, it computes each layer of the reference
   (``dequantize → op(s) → quantize``; float ops between quantized neighbours belong to
   the layer after them) from the runtime's inputs.
3. :func:`layer_steps` — per boundary, the largest integer difference between the two:
   steps of that tensor's own quantization grid.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils._pytree as pytree

from qgraph.core.graph import copy_graph_module, is_op
from qgraph.core.opsets import MAX_POOL_OPS, SHAPE_OPS
from qgraph.ops.qdq import qd

CUT_OPS = frozenset({qd.quantize_per_tensor.default})
"""Activation quantizers with constant qparams (weights are integer constants by now)."""


DATA_MOVEMENT_OPS = SHAPE_OPS | MAX_POOL_OPS
"""Ops that move integers without arithmetic: the quantize after one is no layer boundary."""


def _cuts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Activation quantizes after an op that computes (not after a reshape or a max-pool).

    A quantize after a data-movement op between two grids of the same qparams holds the
    very integers of the quantize before it, moved: no rounding happens there. It is
    checked as part of the next layer. (Returned on its own, XNNPACK takes it into the
    delegate that consumes it as an input, and refuses a delegate whose output is also
    its input.)
    """
    return [
        n
        for n in gm.graph.nodes
        if is_op(n, CUT_OPS) and n.args[0].op != "get_attr" and not is_op(n.args[0], DATA_MOVEMENT_OPS)
    ]


def _plain_signature(gm: torch.fx.GraphModule) -> None:
    """Positional inputs and a flat output tuple (no pytree specs from ``torch.export``)."""
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.graph.lint()
    gm.recompile()


def with_quantized_outputs(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int, list[str]]:
    """A copy of ``gm`` returning ``(*its outputs, *every activation quantize as int32)``.

    Each cut leaves through a cast to int32 of its own (exact; no delegate takes it).
    Returns the graph, how many of its outputs are the model's own, and the cut names.
    """
    probe = copy_graph_module(gm)
    graph = probe.graph
    output = next(n for n in graph.nodes if n.op == "output")
    own = pytree.tree_leaves(output.args[0])
    exposed = []
    for q in _cuts(probe):
        with graph.inserting_after(q):
            exposed.append(graph.call_function(torch.ops.aten._to_copy.default, (q,), {"dtype": torch.int32}))
    output.args = (tuple(own) + tuple(exposed),)
    _plain_signature(probe)
    return probe, len(own), [n.name for n in _cuts(probe)]


def codes(gm: torch.fx.GraphModule, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The runtime's int32 copies of the cuts, back in each cut's own dtype."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: v.to(nodes[name].args[5]) for name, v in values.items()}


def cut_at_quantizers(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose every activation quantize is an output read by a new input.

    Inputs: the original ones, then one per cut (in graph order, named ``<cut>_in``).
    Outputs: the cuts' integer values, in the same order. Returns the graph and the cut names.
    """
    cut = copy_graph_module(gm)
    graph = cut.graph
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    names = []
    for node in _cuts(cut):
        with graph.inserting_after(last_input):
            last_input = graph.placeholder(f"{node.name}_in")
        last_input.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(last_input)
        names.append(node.name)
    output = next(n for n in graph.nodes if n.op == "output")
    nodes = {n.name: n for n in graph.nodes}
    output.args = (tuple(nodes[name] for name in names),)
    graph.eliminate_dead_code()
    _plain_signature(cut)
    return cut, names


def layer_steps(gm: torch.fx.GraphModule, args: tuple, runtime: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per cut, the largest integer difference between the runtime's value and the reference
    layer of ``gm`` computed from the runtime's values at the cuts before it."""
    cut, names = cut_at_quantizers(gm)
    with torch.no_grad():
        reference = cut(*args, *(runtime[n] for n in names))
    steps = {}
    for name, ref in zip(names, reference):
        got = runtime[name]
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        steps[name] = int((got.to(torch.int32) - ref.to(torch.int32)).abs().max().item()) if ref.numel() else 0
    return steps
