"""How an error names a node: its name, op and the source line it came from.

Kept apart from :mod:`qgraph.core.errors`, whose classes load no torch, so that commands that
need no torch (``qgraph --help``, ``qgraph report``) start in a fraction of a second.
"""

from __future__ import annotations

import torch
import torch.fx


def describe_node(node: torch.fx.Node, name: str | None = None) -> str:
    """``'conv2d_3' (aten.conv2d.default) from model.py:12 in features.0.0`` for error texts
    (``name`` in place of the node's own, e.g. its :func:`origin_name`)."""
    where = source_line(node)
    module = node.meta.get("nn_module_stack")
    mod_path = list(module.values())[-1][0] if module else ""
    text = f"'{name or node.name}' ({_op_text(node.target)})"
    if mod_path:
        text += f" in module '{mod_path}'"
    if where:
        text += f" from {where}"
    return text


def _op_text(target: object) -> str:
    """``aten.conv2d.default`` for an ATen op and for ExecuTorch's edge-dialect wrapper of one."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def origin_name(node: torch.fx.Node) -> str:
    """The name of the node ``node`` descends from in the first graph of its line, through
    ``meta['from_node']`` (each ``torch.export`` and interpreter pass records its source): an
    exporter renames nodes (``aten_erfinv_default``) that a user knows from qgraph's graphs."""
    sources = node.meta.get("from_node")
    name = node.name
    while sources:
        name = sources[0].name
        sources = sources[0].from_node
    return name


def source_line(node: torch.fx.Node) -> str:
    """The innermost ``File "...", line N`` of the node's stack trace, or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else ""


def failing_node(exc: BaseException) -> torch.fx.Node | None:
    """The graph node an exporter was working on when it raised ``exc``, or None.

    ``torch.export``'s verifier (which ExecuTorch's ``to_edge`` runs) and ``torch.onnx``'s
    translator loop over graph nodes and raise about an *operator*, keeping the node only as
    the loop variable ``node``. That frame is where the failure is: the innermost frame of
    ``exc``'s traceback (or of its causes) holding a ``call_function`` node as ``node`` names it,
    with the node's own provenance (module, source line).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            node = frame.f_locals.get("node")
            if isinstance(node, torch.fx.Node) and node.op == "call_function":
                return node
        exc = exc.__cause__ or exc.__context__
    return None
