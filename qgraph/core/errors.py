"""Errors qgraph raises.

Every error names what it is about (a node, an argument, a pass) and says what to do.
They all derive from :class:`QGraphError` so a caller can catch qgraph's own failures
apart from bugs in the model.
"""

from __future__ import annotations

import torch.fx


class QGraphError(Exception):
    """Base class of every error qgraph raises on purpose."""


class CaptureError(QGraphError):
    """``torch.export`` could not capture the model."""


class ConfigError(QGraphError, ValueError):
    """An argument or a quantization spec makes no sense."""


class UnsupportedOperatorError(QGraphError):
    """An operator that must be quantized has no rule in the chosen backend."""


class PassOrderError(QGraphError):
    """A pipeline lists a pass before the passes it requires."""


class PassError(QGraphError):
    """A pass failed or left an invalid graph; names the passes that ran before."""


class CalibrationError(QGraphError):
    """Calibration met NaN or inf, or saw no data."""


def describe_node(node: torch.fx.Node) -> str:
    """``'conv2d_3' (aten.conv2d.default) from model.py:12 in features.0.0`` for error texts."""
    where = source_line(node)
    module = node.meta.get("nn_module_stack")
    mod_path = list(module.values())[-1][0] if module else ""
    text = f"'{node.name}' ({node.target})"
    if mod_path:
        text += f" in module '{mod_path}'"
    if where:
        text += f" from {where}"
    return text


def source_line(node: torch.fx.Node) -> str:
    """The innermost ``File "...", line N`` of the node's stack trace, or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else ""
