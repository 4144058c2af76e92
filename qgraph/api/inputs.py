"""The inputs a captured model takes: split from what users have, recorded, checked at every call.

A GraphModule from ``torch.export`` runs only on inputs of the captured structure, dtypes and
static sizes; anything else fails deep inside with a pytree ``TreeSpec`` mismatch, ``Guard
failed: x.size()[2] == 8`` or a kernel's dtype complaint. qgraph records the inputs at capture
(:class:`CapturedInputs` in ``gm.meta``: names, which are positional, and each tensor's
:class:`~qgraph.core.inputs.TensorSpec` with ``None`` for a dynamic dim) and checks every call
of a prepared or converted model against it before the graph runs (a forward pre-hook), so a
wrong input raises :class:`~qgraph.core.errors.InputError` naming the input, the dim, the
captured size and how to capture another.

Inputs as users have them (:func:`split_inputs`, :func:`batch_inputs`): a tensor is one
positional input, a tuple or list several, and a dict (a transformers-style batch) keyword
inputs.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from qgraph.core.errors import InputError
from qgraph.core.inputs import TensorSpec, check_tensor

INPUTS_KEY = "qgraph_inputs"
"""``gm.meta`` key: the :class:`CapturedInputs` of a captured, prepared or converted model."""


@dataclass(frozen=True)
class CapturedInputs:
    """What a captured model's ``forward`` takes.

    ``names`` are its parameters in order; the first ``num_positional`` were captured as
    positional inputs, the rest as keyword inputs. ``tensors[i]`` is the spec of ``names[i]``
    when that input is one tensor (None for a nested or non-tensor input, checked by the graph).
    ``placeholders`` are the graph's input nodes it describes: a graph whose inputs were
    rewritten since (a copy given more inputs) is no longer described, and not checked.
    """

    names: tuple[str, ...]
    num_positional: int
    tensors: tuple[TensorSpec | None, ...]
    placeholders: tuple[str, ...]

    @property
    def keywords(self) -> tuple[str, ...]:
        return self.names[self.num_positional :]

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) if t is not None else n for n, t in zip(self.names, self.tensors)) + ")"


def split_inputs(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` from inputs as users have them.

    A tensor is one positional input, a tuple or list the positional inputs, a dict the
    keyword inputs (``{"input_ids": ids, "attention_mask": mask}``).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        if not all(isinstance(k, str) for k in example_inputs):
            raise InputError("a dict of inputs is keyword inputs: its keys must be the forward's parameter names (str)")
        return (), dict(example_inputs)
    raise InputError(
        "inputs must be a tensor, a tuple or list of positional inputs, or a dict of keyword inputs; "
        f"got {type(example_inputs).__name__}"
    )


def record_inputs(gm: torch.fx.GraphModule) -> CapturedInputs | None:
    """Read what ``gm`` (from ``ExportedProgram.module()``) takes and keep it in ``gm.meta``.

    Names come from its ``forward`` signature, positional / keyword from its pytree input
    spec, dtypes and sizes from its placeholders' example values (a symbolic size is dynamic).
    Returns None for a GraphModule without that information (one ``torch.fx`` traced).
    """
    in_spec = getattr(gm, "_in_spec", None)
    placeholders = gm.graph.find_nodes(op="placeholder")
    if in_spec is None or in_spec.num_children != 2:
        return None
    args_spec, kwargs_spec = in_spec.children()
    names = tuple(inspect.signature(gm.forward).parameters)
    children = [*args_spec.children(), *kwargs_spec.children()]
    if len(names) != len(children) or sum(c.num_leaves for c in children) != len(placeholders):
        return None
    tensors: list[TensorSpec | None] = []
    offset = 0
    for name, child in zip(names, children):
        val = placeholders[offset].meta.get("val") if child.is_leaf() else None
        tensors.append(_spec(name, val) if isinstance(val, torch.Tensor) else None)
        offset += child.num_leaves
    captured = CapturedInputs(names, args_spec.num_children, tuple(tensors), tuple(n.name for n in placeholders))
    gm.meta[INPUTS_KEY] = captured
    return captured


def _spec(name: str, val: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, val.dtype, tuple(d if isinstance(d, int) else None for d in val.shape))


def check_call(
    gm: torch.nn.Module, args: tuple, kwargs: dict[str, Any], where: str = "the model"
) -> tuple[tuple, dict[str, Any]]:
    """Raise :class:`InputError` unless ``gm(*args, **kwargs)`` matches its captured inputs.

    Returns the same inputs in the captured structure: an input captured as positional is
    passed by position, one captured as keyword by name, however the caller passed it.
    """
    captured = gm.meta.get(INPUTS_KEY) if isinstance(gm, torch.fx.GraphModule) else None
    if captured is None or tuple(n.name for n in gm.graph.find_nodes(op="placeholder")) != captured.placeholders:
        return args, kwargs
    names = captured.names
    if len(args) > len(names):
        raise InputError(
            f"{where} takes {len(names)} input{'s' if len(names) != 1 else ''} {captured}, got {len(args)} "
            "positional inputs. calibrate(..., input_fn=lambda batch: ...) picks the inputs out of a batch."
        )
    given = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            also = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise InputError(f"{where} has no input '{key}'; it takes {captured}.{also}")
        if key in given:
            raise InputError(f"{where} got input '{key}' twice (by position and by name)")
        given[key] = value
    missing = ", ".join(repr(n) for n in names if n not in given)
    if missing:
        raise InputError(f"{where} is missing input {missing}; it takes {captured}")
    for name, spec in zip(names, captured.tensors):
        if spec is not None:
            check_tensor(where, spec, given[name], shape_hint=_dynamic_hint)
    return tuple(given[n] for n in names[: captured.num_positional]), {n: given[n] for n in captured.keywords}


def _dynamic_hint(spec: TensorSpec, dims: list[int]) -> str:
    dynamic = sorted({d for d, size in enumerate(spec.shape) if size is None} | set(dims))
    wanted = ", ".join(f"{d}: Dim.AUTO" for d in dynamic)
    return (
        "It was captured with a static size there. Feed that size, or capture with dynamic sizes: "
        f"prepare_ptq / prepare_qat(..., dynamic_shapes={{'{spec.name}': {{{wanted}}}}}) "
        "with torch.export.Dim."
    )


def _check_hook(module: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]):
    if torch.compiler.is_compiling():  # traced by torch.export / compile: the caller checked
        return None
    return check_call(module, args, kwargs)


def install_input_check(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Check every call of ``gm`` against its captured inputs, also on deep copies of it.

    A forward pre-hook put first, before ``torch.export``'s own, whose pytree and guard
    failures name no input. ``GraphModule.__deepcopy__`` drops forward hooks but keeps and
    calls its deepcopy hooks, which put the check back on the copy.
    """
    if _check_hook not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_check_hook, prepend=True, with_kwargs=True)
    if install_input_check not in gm._deepcopy_hooks:
        gm._register_deepcopy_hook(install_input_check)
    guards = getattr(gm, "_guards_fn", None)
    if isinstance(guards, torch.nn.Module) and not isinstance(guards, CapturedGuards):
        gm._guards_fn = CapturedGuards(guards, tuple(n.name for n in gm.graph.find_nodes(op="placeholder")))
    return gm


class CapturedGuards(torch.nn.Module):
    """``torch.export``'s guard function of a captured graph, whose failure names the inputs.

    The sizes a static dim takes are checked before the graph runs; what is left to the
    guards are relations the model's code put between dynamic sizes (a flatten feeding a
    linear of fixed width: ``8 * (H // 2) * (W // 2) == 128``). A broken one raises
    :class:`InputError` with the condition and the input sizes instead of an ``AssertionError``.
    """

    _is_impure = True  # called for its checks only: dead-code elimination must keep it

    def __init__(self, guards: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.guards = guards
        self.names = names

    def forward(self, *args: Any) -> None:
        try:
            return self.guards(*args)
        except AssertionError as exc:
            if torch.compiler.is_compiling():
                raise
            condition = str(exc).split("\n")[0].removeprefix("Guard failed: ")
            sizes = ", ".join(
                f"{n}: {list(a.shape)}" for n, a in zip(self.names, args) if isinstance(a, torch.Tensor)
            )
            raise InputError(
                f"the inputs ({sizes}) break a condition the model was captured under: {condition}. "
                "The model's code ties these sizes together: feed sizes that satisfy it, or capture "
                "with fewer dims dynamic."
            ) from exc


def batch_inputs(gm: torch.fx.GraphModule, batch: Any) -> tuple[tuple, dict[str, Any]]:
    """The model inputs in a batch as a data loader gives it: ``(args, kwargs)``.

    A tensor is the first input. A tuple or list longer than the model's positional inputs
    gives its leading elements (``(images, labels)`` → ``images``). A dict gives the keyword
    inputs the model was captured with; other keys (``labels``) are left out.
    """
    args, kwargs = split_inputs(batch)
    captured = gm.meta.get(INPUTS_KEY)
    if captured is None:
        return args, kwargs
    if kwargs:
        wanted = captured.names[len(args) :]
        return args, {k: v for k, v in kwargs.items() if k in wanted}
    return args[: len(captured.names)], kwargs
