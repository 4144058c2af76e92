"""Fold constants: evaluate every node computed from parameters alone (convert).

In the eval form of QAT's simulated conv+BN the weight is ``w * s`` and the bias
``(b - mean) * s + beta``, computed in the graph from parameters. Evaluating those nodes
once with the very kernels the graph ran leaves constants that are bit-identical to what
eval-mode fake-quant saw, so the weight quantizer's qparams fit them exactly. Nodes with
side effects (in-place ops such as BN's ``num_batches_tracked += 1``) are left to
``remove_dead_nodes`` or kept. The simulated-BN records are dropped: there is no BN left.
"""

from __future__ import annotations

import torch
import torch.fx

from qgraph.core.graph import add_constant, get_constant, remove_dead_nodes
from qgraph.core.meta import EVAL_FORM_KEY, SIMULATED_BN_KEY
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.quant.batch_norm import bn_counter_updates

aten = torch.ops.aten


def _is_constant(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


class FoldBn(Pass):
    """Constant-fold parameter-only computations; finish QAT conv+BN folding."""

    name = "fold_bn"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        folded = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.is_impure() or not node.all_input_nodes:
                continue
            if not all(_is_constant(n) for n in node.all_input_nodes):
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: get_constant(gm, n))
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: get_constant(gm, n))
            with torch.no_grad():
                value = node.target(*args, **kwargs)
            if not isinstance(value, torch.Tensor):
                continue
            if value._base is not None:  # a view (reshape of a parameter): own its storage
                value = value.clone()
            with gm.graph.inserting_before(node):
                const = add_constant(gm, _folded_name(node), value, like=node)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            folded += 1
        simulated = self._drop_simulated_bn(gm)
        if folded or simulated:
            remove_dead_nodes(gm)
        return PassResult(gm, bool(folded or simulated))

    @staticmethod
    def _drop_simulated_bn(gm: torch.fx.GraphModule) -> int:
        """Drop the simulated-BN records and the BN counters; the number of convs that had one.

        The records name their nodes (see :class:`~qgraph.passes.prepare.simulated_bn.SimulatedBn`);
        one walk of the graph resolves them all.
        """
        nodes = {n.name: n for n in gm.graph.nodes}
        simulated = [n for n in nodes.values() if SIMULATED_BN_KEY in n.meta]
        gammas = []
        for conv in simulated:
            info = conv.meta.pop(SIMULATED_BN_KEY)
            if info.form != "eval":
                raise RuntimeError(f"conv '{conv.name}' is still in QAT train form; call eval_mode before folding")
            gammas.append(nodes.get(info.gamma))
        for counter in bn_counter_updates(gm, gammas):
            gm.graph.erase_node(counter)
        if simulated:
            for n in gm.graph.nodes:
                n.meta.pop(EVAL_FORM_KEY, None)
        return len(simulated)


def _folded_name(node: torch.fx.Node) -> str:
    """``features.0.weight`` → ``qgraph_features_0_weight_<op>``: name a folded constant after
    the first parameter it came from, so dumps and state dicts stay readable."""
    source = node
    while source.op != "get_attr":
        source = source.all_input_nodes[0]
    op = getattr(node.target, "__name__", "folded").split(".")[0]
    return f"{source.target}_{op}"
