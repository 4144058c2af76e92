"""The outside of an ONNX file: input / output names, named dynamic axes and metadata.

A deployment engineer binds a runtime to a model by its interface, so it must not depend on
how the graph was quantized. ``torch.onnx`` names the outputs after the last internal node
(``dequantize_per_tensor_40``, ``dynamic_linear``, ``linear_14``: they change with the
scheme) and the dynamic axes after ``torch.export``'s shape symbols (``s77``). Here:

* **inputs** are named after the model's ``forward`` arguments (a captured GraphModule keeps
  them as its placeholders); an argument holding several tensors gives ``name_0``, ``name_1``...
* **outputs** are ``output``, or ``output_0`` ... ``output_<n-1>`` when there are several;
* **axes**: a symbol first seen on axis 0 of an input is ``batch``, any other ``dim_<axis>``
  (a number is added when two different symbols would share a name). Shape expressions in the
  graph (``64*s77``) are rewritten with the same names;
* **metadata_props** say what produced the file (:data:`METADATA_KEYS`).

A name the caller gives that an internal value already carries is taken from that value,
which gets a fresh name, so every name in the file stays unique (ONNX's SSA rule).
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from typing import Any, Mapping, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from qgraph.core.errors import ConfigError
from qgraph.core.opsets import DEQUANTIZE_OPS, DYNAMIC_DEQUANTIZE_OPS
from qgraph.ops.qdq import qd

METADATA_KEYS = ("qgraph.version", "qgraph.backend", "qgraph.scheme", "qgraph.opset", "qgraph.exporter")
"""``metadata_props`` written into every file: qgraph's version, the backend whose rules
quantized the model, a summary of its quantized tensors (:func:`quantization_summary`), the
ONNX opset and the exporter (``torch.onnx`` and torch's version)."""

_TORCH_SYMBOL = re.compile(r"^s\d+$")  # torch.export's shape symbols: s0, s77, ...


# -- names ---------------------------------------------------------------------------------
def forward_arg_names(model: torch.nn.Module, count: int) -> list[str]:
    """The names of the first ``count`` positional arguments of ``model``'s ``forward``.

    A GraphModule from ``torch.export`` keeps the original names in its pytree codegen
    (``orig_args``) and as its placeholders' targets; another module's are read from the
    signature of its ``forward``. Arguments the signature does not name (``*args``) are
    ``input_<i>``.
    """
    names: list[str] = []
    if isinstance(model, torch.fx.GraphModule):
        info = getattr(model.graph._codegen, "pytree_info", None)
        names = list(info.orig_args) if info is not None else []
        if len(names) < count:
            names = [str(n.target) for n in model.graph.nodes if n.op == "placeholder"]
    else:
        params = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = names[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def default_input_names(model: torch.nn.Module, args: Sequence[Any]) -> list[str]:
    """One name per tensor the ONNX model takes, in the exporter's (flattened) order."""
    names: list[str] = []
    for name, arg in zip(forward_arg_names(model, len(args)), args):
        if isinstance(arg, torch.Tensor):
            names.append(name)
            continue
        tensors = [leaf for leaf in pytree.tree_leaves(arg) if isinstance(leaf, torch.Tensor)]
        names += [f"{name}_{j}" for j in range(len(tensors))]
    return names


def default_output_names(count: int, taken: Sequence[str] = ()) -> list[str]:
    """``["output"]`` for one output, ``["output_0", ..., "output_<n-1>"]`` for several; a
    name an input already has (``taken``) gets a number added."""
    used = set(taken)
    return [_fresh(base, used) for base in (["output"] if count == 1 else [f"output_{i}" for i in range(count)])]


def check_names(argument: str, names: Any, count: int | None = None, found: Sequence[str] = ()) -> list[str]:
    """``names`` as a list, or :class:`ConfigError` naming ``argument`` when it cannot be
    the names of ``count`` values (``found``: what the exporter called them; ``count=None``
    checks only the names themselves)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"export_onnx({argument}=...) must be a list of strings, got {type(names).__name__}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ConfigError(f"export_onnx({argument}=...): {bad[0]!r} is not a name; give non-empty strings")
    if count is not None and len(names) != count:
        raise ConfigError(
            f"export_onnx({argument}=...) gives {len(names)} name(s) but the model has {count}: {list(found)}"
        )
    repeated = [n for n, k in Counter(names).items() if k > 1]
    if repeated:
        raise ConfigError(f"export_onnx({argument}=...) repeats {repeated}; every name must be unique")
    return names


def check_disjoint(input_names: Sequence[str], output_names: Sequence[str]) -> None:
    clash = set(input_names) & set(output_names)
    if clash:
        raise ConfigError(f"export_onnx: {sorted(clash)} named both an input and an output; names must differ")


def tensor_count(args: Sequence[Any]) -> int:
    """How many tensors ``args`` hold: the inputs the ONNX model will have."""
    return sum(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(list(args)))


def name_interface(model, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Rename the graph inputs and outputs of the ``onnx_ir`` ``model`` in place.

    An output that is also an input, or that appears twice among the outputs, is first given
    its own ``Identity`` node, so that each interface name denotes one value.
    """
    import onnx_ir as ir

    check_disjoint(input_names, output_names)
    graph = model.graph
    seen = set(graph.inputs)
    for i, value in enumerate(list(graph.outputs)):
        if value in seen:
            identity = ir.node("Identity", [value])
            graph.append(identity)
            graph.outputs[i] = identity.outputs[0]
        seen.add(graph.outputs[i])
    wanted = {*input_names, *output_names}
    interface = {*graph.inputs, *graph.outputs}
    taken = {v.name for v in _values(graph)}
    for value in _values(graph):
        if value.name in wanted and value not in interface:
            value.name = _fresh(f"{value.name}_inner", taken)
    for value, name in [*zip(graph.inputs, input_names), *zip(graph.outputs, output_names)]:
        value.name = name


def _values(graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _fresh(base: str, taken: set) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def axis_names(model) -> dict[str, str]:
    """``{torch symbol: name}`` for the dynamic axes of the ``onnx_ir`` model's inputs:
    ``batch`` for a symbol first seen on axis 0, ``dim_<axis>`` for others."""
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            symbol = getattr(dim, "value", None)
            if isinstance(symbol, str) and _TORCH_SYMBOL.match(symbol) and symbol not in names:
                names[symbol] = _fresh("batch" if axis == 0 else f"dim_{axis}", set(names.values()))
    return names


# -- metadata ------------------------------------------------------------------------------
_GRANULARITY = {
    qd.dequantize_per_tensor.default: "per-tensor",
    qd.dequantize_per_channel.default: "per-channel",
    qd.dequantize_per_channel_group.default: "per-group",
    qd.dequantize_per_tensor.tensor: "per-tensor dynamic",
    qd.dequantize_per_token.default: "per-token dynamic",
}
_ROLES = ("weights", "activations", "biases")


def quantization_summary(gm: torch.nn.Module) -> str:
    """What the quantized tensors of a converted graph are, by role, grid and granularity.

    Read from the dequantize ops (what the file will hold, whatever the config said): a
    dequantize of a constant is a weight, of an int32 constant a bias, anything else an
    activation. The grid is named by its width, ``int<bits>[qmin,qmax]`` with ``bits`` the
    number of bits its ``qmax - qmin + 1`` levels need (int4 values stored in int8 read
    ``int4[-8,7]``). Example: ``weights int8[-127,127] per-channel x3; activations
    int8[-128,127] per-tensor x6``. A model with none reads ``float``.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        return "float"
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in DEQUANTIZE_OPS | DYNAMIC_DEQUANTIZE_OPS:
            continue
        args = _bound_args(node)
        qmin, qmax = int(args["quant_min"]), int(args["quant_max"])
        source = node.args[0]
        constant = isinstance(source, torch.fx.Node) and source.op == "get_attr"
        role = ("biases" if args["dtype"] == torch.int32 else "weights") if constant else "activations"
        granularity = _GRANULARITY[node.target]
        if "group_size" in args:
            granularity += f"({args['group_size']})"
        counts[(role, _grid(qmin, qmax), granularity)] += 1
    if not counts:
        return "float"
    parts = sorted(counts.items(), key=lambda item: (_ROLES.index(item[0][0]), item[0]))
    return "; ".join(f"{role} {grid} {granularity} x{n}" for (role, grid, granularity), n in parts)


def _bound_args(node: torch.fx.Node) -> dict[str, Any]:
    schema = node.target._schema  # type: ignore[union-attr]
    bound = {a.name: v for a, v in zip(schema.arguments, node.args)}
    bound.update(node.kwargs)
    return bound


def _grid(qmin: int, qmax: int) -> str:
    bits = (qmax - qmin).bit_length()
    return f"{'int' if qmin < 0 else 'uint'}{bits}[{qmin},{qmax}]"


def metadata(model: torch.nn.Module, opset: int, given: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``metadata_props`` of :data:`METADATA_KEYS`.

    ``given`` supplies ``qgraph.version``, ``qgraph.backend`` and ``qgraph.scheme`` (what
    :func:`qgraph.export_onnx` knows of the converted model before lowering it); without them
    the scheme is summarized from ``model`` itself, the backend is ``none`` and the version
    is left out.
    """
    props = {"qgraph.backend": "none", "qgraph.scheme": quantization_summary(model), **(given or {})}
    props["qgraph.opset"] = str(opset)
    props["qgraph.exporter"] = f"torch.onnx (torch {torch.__version__})"
    return props


def set_metadata(model, props: Mapping[str, str]) -> None:
    """Write ``props`` into the ``onnx_ir`` model's ``metadata_props``, and name qgraph as
    its producer (what Netron and ``onnx.ModelProto.producer_name`` show)."""
    model.metadata_props.update(props)
    model.producer_name = "qgraph"
    model.producer_version = props.get("qgraph.version", "")
