"""Merge LoRA: fold each adapter into its base weight and re-observe the weight's range.

For an adapter of rank ``r`` added by :mod:`qgraph.passes.lora.add_lora`::

    x Wᵀ + s · (x Aᵀ) Bᵀ  =  x (W + s · B A)ᵀ        (s = alpha / r)

so the base weight becomes ``W' = W + s · B @ A`` and the adapter's nodes go away; in
float the outputs agree to fp32 rounding (the two sides sum the same products in a
different order). In a prepared graph the weight quantizer of ``W'`` then forgets the range
it saw during training and observes ``W'`` once, so ``convert`` quantizes the merged
weight with the range of the merged weight (int8 per-channel, int4 per-group: whatever
spec it has). The quantized result is ``Q(W + sBA)``, not the ``Q(W) + sBA`` that
training saw: the update survives only where it moves a weight across a rounding
boundary. That gap is what the merged and the unmerged rows of a report measure. An
adapter added with ``fake_quant_merged=True`` already trained through ``fq_w(W + sBA)``:
merging it removes the ``B @ A`` nodes and changes no output.

A weight that other nodes also read (tied embeddings) is not changed in place: the merged
weight becomes a new parameter that only the adapted linears read.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from qgraph.core.errors import ConfigError
from qgraph.core.graph import free_attr_name, get_constant, is_op
from qgraph.core.meta import LORA_BASE_KEY, LORA_KEY
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.passes.lora.adapter import LoraAdapter, is_quantizer_call

aten = torch.ops.aten


class MergeLora(Pass):
    """Fold every LoRA adapter of the graph into its base linear's weight."""

    name = "merge_lora"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        outputs: dict[str, list[torch.fx.Node]] = {}
        for node in gm.graph.nodes:
            if is_op(node, {aten.add.Tensor}) and LORA_KEY in node.meta:
                outputs.setdefault(node.meta[LORA_KEY], []).append(node)
        for name, adds in outputs.items():
            adapter = gm.get_submodule(name)
            assert isinstance(adapter, LoraAdapter)
            for add in adds:
                # The adapter's sum leaves the graph: the base linear's output (parallel
                # adapter) or the base weight (fake_quant_merged) takes its place.
                add.replace_all_uses_with(add.args[0])
            for node in reversed([n for n in gm.graph.nodes if n.meta.get(LORA_KEY) == name]):
                gm.graph.erase_node(node)  # reverse graph order: each node's users are gone first
            linears = [n for n in gm.graph.nodes if n.meta.get(LORA_BASE_KEY) == name]
            self._fold(gm, adapter, linears)
            for lin in linears:
                del lin.meta[LORA_BASE_KEY]
            delattr(gm, name)
        if outputs:  # a new dict: graph copies share meta values
            left = {path: name for path, name in gm.meta.get(LORA_KEY, {}).items() if name not in outputs}
            gm.meta.pop(LORA_KEY, None)
            if left:
                gm.meta[LORA_KEY] = left
        return PassResult(gm, bool(outputs))

    def _fold(self, gm: torch.fx.GraphModule, adapter: LoraAdapter, linears: list[torch.fx.Node]) -> None:
        quantizers = {lin.args[1] for lin in linears if is_quantizer_call(lin.args[1])}
        readers = list(quantizers) + [lin for lin in linears if not is_quantizer_call(lin.args[1])]
        getters = {_weight_arg(r) for r in readers}
        targets = {str(g.target) for g in getters}
        if len(targets) != 1 or any(g.op != "get_attr" for g in getters):
            raise ConfigError(f"merge_lora: the linears of adapter '{adapter.target}' read {sorted(targets)}, "
                              "not one stored weight; keep this adapter unmerged")
        for q in quantizers:
            callers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == q.target]
            if any(c.args[0] not in getters for c in callers):
                raise ConfigError(f"merge_lora: weight quantizer '{q.target}' of adapter '{adapter.target}' also "
                                  "quantizes other tensors, so re-observing it on the merged weight would change "
                                  "them; keep this adapter unmerged")
        weight = get_constant(gm, next(iter(getters)))
        merged = (weight.detach().float() + adapter.delta_weight().detach().float()).to(weight.dtype)
        if _tied(gm, getters, set(readers)):
            new = free_attr_name(gm, next(iter(targets)).replace(".", "_") + "_lora_merged")
            gm.register_parameter(new, nn.Parameter(merged, requires_grad=weight.requires_grad))
            for reader in readers:
                old = _weight_arg(reader)
                with gm.graph.inserting_before(reader):
                    fresh = gm.graph.get_attr(new)
                fresh.meta = dict(old.meta)
                reader.replace_input_with(old, fresh)
        else:
            with torch.no_grad():
                weight.copy_(merged)
        for q in quantizers:
            _reobserve(gm.get_submodule(str(q.target)), merged, str(q.target))


def _weight_arg(reader: torch.fx.Node) -> torch.fx.Node:
    """The weight node a weight quantizer (its input) or a bare linear (its args[1]) reads."""
    return reader.args[0] if is_quantizer_call(reader) else reader.args[1]


def _tied(gm: torch.fx.GraphModule, getters: set, readers: set) -> bool:
    """True when the weight is read by anything but ``readers`` (the adapted linears' weight
    quantizers, or the linears themselves)."""
    target = str(next(iter(getters)).target)
    others = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == target and n not in getters]
    return bool(others) or any(user not in readers for g in getters for user in g.users)


def _reobserve(quantizer: nn.Module, weight: torch.Tensor, name: str) -> None:
    """Forget the trained range and observe ``weight`` once, whatever the module's mode."""
    if not (hasattr(quantizer, "min_val") and hasattr(quantizer, "observer_enabled")):
        raise ConfigError(f"merge_lora: weight quantizer '{name}' ({type(quantizer).__name__}) keeps no "
                          "observed range to re-observe; keep its adapter unmerged")
    quantizer.min_val = torch.empty(0, device=weight.device)
    quantizer.max_val = torch.empty(0, device=weight.device)
    enabled, training = quantizer.observer_enabled.clone(), quantizer.training
    quantizer.observer_enabled.fill_(1)
    quantizer.train()
    with torch.no_grad():
        quantizer(weight)
    quantizer.observer_enabled.copy_(enabled)
    quantizer.train(training)
