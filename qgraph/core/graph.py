"""Small helpers over ``torch.fx`` graphs: op sets, users, constants and provenance.

Ops are matched by op object (``torch.ops.aten.conv2d.default``), never by name.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Iterable

import torch
import torch.fx
from torch.fx.traceback import NodeSource, NodeSourceAction

from qgraph.core.gc_pause import gc_paused

aten = torch.ops.aten



PROVENANCE_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn")


def is_op(node: object, ops: Iterable) -> bool:
    """True when ``node`` is a ``call_function`` node whose target is in ``ops``."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ops


def single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The only user of ``node``, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def get_constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The tensor behind a ``get_attr`` node."""
    if node.op != "get_attr":
        raise TypeError(f"node '{node.name}' is {node.op}, not get_attr")
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def add_constant(
    gm: torch.fx.GraphModule, name_hint: str, value: torch.Tensor, *, like: torch.fx.Node | None = None
) -> torch.fx.Node:
    """Register ``value`` as a buffer of ``gm`` under a fresh name and return its get_attr node.

    The tensor is stored as given (no copy): pass a tensor nothing else holds.

    The node is inserted at the current insertion point. ``like`` gives the provenance.
    """
    base = name_hint.replace(".", "_")
    if not base.startswith("qgraph_"):
        base = f"qgraph_{base}"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach())
    node = gm.graph.get_attr(name)
    node.meta["val"] = value.detach()
    if like is not None:
        copy_provenance(node, like, "add_constant")
    return node


def free_attr_name(gm: torch.fx.GraphModule, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name ``gm`` has no attribute of."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def copy_provenance(new: torch.fx.Node, source: torch.fx.Node, pass_name: str, action: str = "create") -> None:
    """Give ``new`` the source location and module of ``source``, and record where it came from.

    ``from_node`` gains a :class:`NodeSource` for ``source`` with ``pass_name``, the way
    ``torch.export`` records the history of a node across passes.

    ``NodeSource(source)`` would deep-copy ``source``'s whole history, whose depth grows with
    every pass; here the new record shares it instead, as ``Graph.node_copy`` shares ``meta``
    between a graph and its copy. A history is never changed once written (``NodeSource``
    caches its ``to_dict()``), so sharing is safe, and ``to_dict()`` comes out the same.
    """
    for key in PROVENANCE_KEYS:
        if key in source.meta and key not in new.meta:
            new.meta[key] = source.meta[key]
    act = NodeSourceAction.REPLACE if action == "replace" else NodeSourceAction.CREATE
    record = NodeSource(None, pass_name, act)
    record.node_info = NodeSource.NodeInfo(source.name, str(source.target), id(source.graph))
    record.from_node = list(source.meta.get("from_node", ()))
    new.meta["from_node"] = [record]


def replace_node(gm: torch.fx.GraphModule, old: torch.fx.Node, new: torch.fx.Node, pass_name: str) -> None:
    """Make ``new`` stand in for ``old`` everywhere and erase ``old``.

    ``new`` keeps ``old``'s provenance (recorded as a replacement by ``pass_name``) and its
    ``meta["val"]``: the rewrite computes the same tensor, so shape propagation holds.
    """
    copy_provenance(new, old, pass_name, action="replace")
    new.meta["val"] = old.meta.get("val")
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost module the node was traced from ('' at the top)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def module_types(node: torch.fx.Node) -> list[str]:
    """Qualified class names of every module on the node's stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for _, (_, cls) in stack.items():
        out.append(cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
    return out


def remove_dead_nodes(gm: torch.fx.GraphModule) -> bool:
    """Erase side-effect-free nodes nobody uses (and get_attr targets left unused)."""
    changed = gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers(recurse=False)):
        if name.startswith("qgraph_") and name not in used:
            delattr(gm, name)
    return changed


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` that shares no mutable state with it.

    ``copy.deepcopy`` gives each node a new meta dict but keeps its values; qgraph keeps
    mutable records there (a QAT conv's simulated-BN form is switched in place by
    ``train_mode``/``eval_mode``), so mutable dataclass values are copied as well. Methods
    bound to the instance (``train``/``eval`` from ``bind_mode_methods``) are not copied:
    they would act on the original.
    """
    with gc_paused():
        new = copy.deepcopy(gm)
    new.meta = dict(gm.meta)
    new.__dict__.pop("train", None)
    new.__dict__.pop("eval", None)
    for node in new.graph.nodes:
        for key, value in node.meta.items():
            if dataclasses.is_dataclass(value) and not type(value).__dataclass_params__.frozen:
                node.meta[key] = dataclasses.replace(value)
    return new
