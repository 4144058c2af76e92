"""Capture: ``torch.export`` a model into an ATen GraphModule with a dynamic batch dimension."""

from __future__ import annotations

import copy
import inspect
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from qgraph.api.inputs import install_input_check, record_inputs, split_inputs
from qgraph.core.errors import CaptureError, InputError

EXAMPLE_INPUTS_KEY = "qgraph_example_inputs"
"""``gm.meta`` key: the positional example inputs the model was captured with."""


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
    return tuple(_batch_dim(a) for a in args)


def _batch_dim(value: Any) -> Any:
    """``{0: Dim.AUTO}`` for each tensor in ``value`` (a tensor or a nest of them), else None."""
    return pytree.tree_map(lambda a: {0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None, value)


def capture(
    model: nn.Module, example_inputs: Any, dynamic_shapes: Any = None, kwargs: dict[str, Any] | None = None
) -> torch.fx.GraphModule:
    """Export ``model`` with ``torch.export`` and return its GraphModule (ATen training IR).

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (a transformers-style batch: ``{"input_ids": ids, "attention_mask": mask}``); ``kwargs``
    adds keyword inputs to positional ones.

    The batch dimension (dim 0 of every tensor input) is dynamic unless ``dynamic_shapes``
    says otherwise, so a prepared model trains on a smaller last batch and serves batch 1.
    A batch-1 example would fix the batch at 1 (``torch.export`` specializes sizes 0 and 1),
    so the model is traced on the example repeated to batch 2 when every tensor input has
    batch 1; the graph then accepts any batch (a model that runs only at batch 1 is captured
    as given, with its batch fixed). ``dynamic_shapes`` as a dict names only the
    inputs whose dims it changes (``{"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}`` for any
    batch, height and width); the others keep a dynamic batch. A tuple gives every input's
    spec as ``torch.export`` takes it (``(None,)``: all sizes static).

    The model is not modified, and the GraphModule owns copies of its parameters, so
    training it leaves the model as it was. Every call of the GraphModule is checked against
    the captured inputs (:mod:`qgraph.api.inputs`). A model ``torch.export`` cannot trace
    raises :class:`CaptureError` with the exporter's reason.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        args, kw = split_inputs(example_inputs)
    except InputError as exc:
        raise CaptureError(f"example_inputs: {exc}") from exc
    kw.update(kwargs or {})
    # A strided view (a window of a longer tensor) would make the exported guards depend on
    # its strides, and exporting the captured graph again then fails inside torch.export.
    args, kw = pytree.tree_map(lambda a: a.contiguous() if isinstance(a, torch.Tensor) else a, (args, kw))
    try:
        bound = inspect.signature(model.forward).bind(*args, **kw).arguments
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    shapes = _dynamic_shapes(bound, dynamic_shapes)
    traced = _batch_of_two(args, kw, bound, shapes)
    try:  # on a copy: the exported module would alias the model's tensors
        program = torch.export.export(copy.deepcopy(model), *(traced or (args, kw)), dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        if traced is None:
            raise _capture_error(model, args, kw, exc) from exc
        try:  # the model may need batch 1 (a reshape to 1 in its code): capture it as given
            program = torch.export.export(copy.deepcopy(model), args, kw, dynamic_shapes=shapes)
        except Exception as exc:
            raise _capture_error(model, args, kw, exc) from exc
    gm = program.module()
    gm.meta[EXAMPLE_INPUTS_KEY] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    record_inputs(gm)
    return install_input_check(gm)


def capture_program(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The GraphModule of a program exported by the user (``torch.export.export`` / ``torch.export.load``).

    It is used as it is, instead of capturing again: its shapes are the program's (a program
    exported with a batch of 1 keeps batch 1). The GraphModule owns copies of the program's
    tensors (``program.module()`` alone would alias them), so preparing and training it
    leaves the program as it was.
    """
    gm = copy.deepcopy(program).module()
    args = program.example_inputs[0] if program.example_inputs else ()
    gm.meta[EXAMPLE_INPUTS_KEY] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    record_inputs(gm)
    return install_input_check(gm)


def _capture_error(model: nn.Module, args: tuple, kwargs: dict, exc: Exception) -> CaptureError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    static = "(" + ", ".join(["None"] * (len(args) + len(kwargs))) + ",)"
    return CaptureError(
        f"torch.export could not capture {type(model).__name__}: {first}\n"
        "Make the forward traceable (no data-dependent Python control flow, no .item() "
        f"driving shapes), or pass dynamic_shapes={static} to capture with static shapes. "
        f"Full exporter message:\n{exc}"
    )


def _dynamic_shapes(bound: dict[str, Any], given: Any) -> Any:
    """The ``dynamic_shapes`` to export with: a dynamic batch for every input ``given`` leaves out.

    ``bound`` maps the forward's parameter names to the example inputs. ``given`` None or a
    dict: a dict keyed by those names, where each tensor input not in ``given`` gets
    ``{0: Dim.AUTO}``. Anything else goes to ``torch.export`` as is.
    """
    if given is not None and not isinstance(given, dict):
        return given
    unknown = set(given or {}) - set(bound)
    if unknown:
        raise CaptureError(
            f"dynamic_shapes names {sorted(unknown)}, which are not inputs of this capture; "
            f"the inputs are {list(bound)}"
        )
    return {name: (given or {}).get(name, _batch_dim(value)) for name, value in bound.items()}


def _batch_of_two(args: tuple, kwargs: dict, bound: dict[str, Any], shapes: Any) -> tuple[tuple, dict] | None:
    """The example repeated to batch 2 when every tensor input has batch 1 and a dynamic batch
    (``torch.export`` would otherwise specialize the batch to 1), else None."""
    if not isinstance(shapes, dict):
        return None
    tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    nested = [a for k, v in bound.items() if k not in tensors for a in pytree.tree_leaves(v) if isinstance(a, torch.Tensor)]
    if not tensors or nested:
        return None
    if not all(t.dim() > 0 and t.shape[0] == 1 and 0 in (shapes.get(k) or {}) for k, t in tensors.items()):
        return None
    return pytree.tree_map(lambda a: torch.cat([a, a]) if isinstance(a, torch.Tensor) else a, (args, kwargs))
