"""Capture: ``torch.export`` a model into an ATen GraphModule with a dynamic batch dimension."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn
from torch.export import Dim

from qgraph.core.errors import CaptureError


def as_args(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional arguments (a lone tensor becomes ``(t,)``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tensor or a tuple of positional arguments, got {type(example_inputs).__name__}"
        )
    return example_inputs


def batch_dynamic_shapes(args: Sequence[Any]) -> tuple:
    """Mark dim 0 of every tensor argument dynamic (``Dim.AUTO``).

    ``AUTO`` lets the exporter relate the batch dims of several inputs (or keep one static
    when the model needs it, e.g. a weight passed as an input) instead of failing.
    """
    return tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def capture(model: nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> torch.fx.GraphModule:
    """Export ``model`` with ``torch.export`` and return its GraphModule (ATen training IR).

    The batch dimension (dim 0 of every tensor input) is dynamic unless ``dynamic_shapes``
    says otherwise, so a prepared model trains on a smaller last batch and serves batch 1.
    The model is not modified, and the GraphModule owns copies of its parameters, so
    training it leaves the model as it was. A model ``torch.export`` cannot trace raises
    :class:`CaptureError` with the exporter's reason.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model must be an nn.Module, got {type(model).__name__}")
    # A strided view (a window of a longer tensor) would make the exported guards depend on
    # its strides, and exporting the captured graph again then fails inside torch.export.
    args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in as_args(example_inputs))
    shapes = batch_dynamic_shapes(args) if dynamic_shapes is None else dynamic_shapes
    private = copy.deepcopy(model)  # the exported module would alias the model's tensors
    try:
        program = torch.export.export(private, args, dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first}\n"
            "Make the forward traceable (no data-dependent Python control flow, no .item() "
            "driving shapes), or pass dynamic_shapes=() to capture with static shapes. "
            f"Full exporter message:\n{exc}"
        ) from exc
    gm = program.module()
    gm.meta["qgraph_example_inputs"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    return gm


def capture_program(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The GraphModule of a program exported by the user (``torch.export.export`` / ``torch.export.load``).

    It is used as it is, instead of capturing again: its shapes are the program's (a program
    exported with a batch of 1 keeps batch 1). The GraphModule owns copies of the program's
    tensors (``program.module()`` alone would alias them), so preparing and training it
    leaves the program as it was.
    """
    gm = copy.deepcopy(program).module()
    args = program.example_inputs[0] if program.example_inputs else ()
    gm.meta["qgraph_example_inputs"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    return gm
