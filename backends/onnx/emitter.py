"""Emit an ONNX model in QDQ form and run it in ONNX Runtime.

``torch.onnx.export(dynamo=True)`` maps ``quantized_decomposed.quantize_per_*`` /
``dequantize_per_*`` to ``QuantizeLinear`` / ``DequantizeLinear``; ONNX Runtime's graph
optimizer then fuses ``DQ → Conv → Q`` into integer kernels. The file's interface (input and
output names, the ``batch`` axis, metadata) is set by :mod:`qgraph.backends.onnx.interface`.

Dynamic quantization has no ONNX translation in ``torch.onnx``; :func:`dynamic_translations`
supplies them (see :mod:`qgraph.backends.onnx.dynamic`); group-wise int4 / int8 weights
become opset-21 blocked ``DequantizeLinear`` (:mod:`qgraph.backends.onnx.lowbit`). A spatial
mean of uint8 codes becomes ``GlobalAveragePool``, which ONNX Runtime fuses into an integer kernel
(:mod:`qgraph.backends.onnx.global_pool`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch

from qgraph.backends.onnx import interface
from qgraph.backends.onnx.dynamic import dynamic_translations
from qgraph.backends.onnx.global_pool import use_global_average_pool
from qgraph.backends.onnx.lowbit import group_translations, needs_opset
from qgraph.core.errors import ConfigError, ModelFileError
from qgraph.core.files import atomic_path, read_head
from qgraph.core.inputs import TensorSpec, check_count, check_tensor
from qgraph.core.quiet import quiet, verbose

DEFAULT_OPSET = 20
"""The opset written when the model needs no newer one: ``torch.onnx``'s default (torch 2.14),
which ONNX Runtime runs since 1.16."""
MIN_OPSET = 18
"""``torch.onnx`` translates into opset 18 and later; an older opset would go through a
version converter that may fail, so it is refused."""


def write_onnx(
    model: torch.nn.Module,
    args: Sequence[Any],
    dynamic_shapes: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    properties: Mapping[str, str] | None = None,
) -> str:
    """Export ``model`` with ``torch.onnx`` and write it to ``path`` atomically.

    The interface is named as :mod:`qgraph.backends.onnx.interface` says (defaults: the
    ``forward`` arguments, ``output`` / ``output_<i>``, ``batch``); ``properties``
    (``qgraph.version``, ``qgraph.backend``, ``qgraph.scheme``) go into ``metadata_props``
    with the opset and the exporter. The file passes ``onnx.checker.check_model`` with
    ``full_check`` (shape inference included) before it replaces anything at ``path``.
    """
    import onnx

    opset = resolve_opset(model, opset)
    if input_names is not None:
        input_names = interface.check_names("input_names", input_names, interface.tensor_count(args))
    if output_names is not None:
        output_names = interface.check_names("output_names", output_names)
    if input_names is not None and output_names is not None:
        interface.check_disjoint(input_names, output_names)
    with quiet():
        program = torch.onnx.export(
            model,
            tuple(args),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            optimize=True,
            custom_translation_table={**dynamic_translations(), **group_translations()},
            opset_version=opset,
        )
    graph = program.model.graph
    found_in, found_out = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    if input_names is None:
        input_names = interface.default_input_names(model, args)
        if len(input_names) != len(found_in):  # arguments the exporter folded or split: keep its names
            input_names = found_in
    input_names = interface.check_names("input_names", input_names, len(found_in), found_in)
    if output_names is None:
        output_names = interface.default_output_names(len(found_out), taken=input_names)
    output_names = interface.check_names("output_names", output_names, len(found_out), found_out)
    interface.name_interface(program.model, input_names, output_names)
    program.rename_axes(interface.axis_names(program.model))
    interface.set_metadata(program.model, interface.metadata(model, opset, properties))
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        if use_global_average_pool(proto):
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return str(path)


def resolve_opset(model: torch.nn.Module, opset: int | None) -> int:
    """``opset``, checked against what ``torch.onnx`` writes and what the model needs (21 for
    group-wise weights); ``None`` is the lowest the model allows, at least :data:`DEFAULT_OPSET`."""
    import onnx

    needed = needs_opset(model) or MIN_OPSET
    if opset is None:
        return max(needed, DEFAULT_OPSET)
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(
            f"export_onnx(opset={opset!r}): choose an integer opset from {MIN_OPSET} (the oldest torch.onnx "
            f"writes) to {newest} (the newest the installed onnx knows)"
        )
    if opset < needed:
        raise ConfigError(
            f"export_onnx(opset={opset}): this model has group-wise (int4 / int8) weights, which need "
            f"DequantizeLinear with block_size, first in opset {needed}; pass opset={needed} or later"
        )
    return opset


def load_onnx(path: str | os.PathLike, optimize: bool = True, spin: bool = True) -> Callable[..., Any]:
    """A callable that runs the model in ONNX Runtime's CPU provider and returns tensors.

    ``optimize=False`` disables graph optimizations (plain QDQ, no fused integer kernels):
    the reference behaviour of the Q/DQ graph, useful to tell fusion effects apart.
    ``spin=False`` lets the session's worker threads sleep as soon as a run ends, instead of
    spinning for work: for several sessions that take turns in one process (a benchmark),
    where one session's spinning threads would slow the next one's run.

    A missing, empty or unloadable file raises :class:`~qgraph.core.errors.ModelFileError`
    (``ModelFileNotFoundError`` when missing) naming the path. The callable checks its inputs'
    number, dtypes and sizes against the model's inputs (symbolic dims take any size).
    """
    import onnxruntime as ort

    head, _ = read_head(path, "ONNX model")
    if head[4:6] == b"ET":
        raise ModelFileError(f"'{path}' is an ExecuTorch program, not an ONNX model: load it with qgraph.load_pte")
    options = ort.SessionOptions()
    if not verbose():
        options.log_severity_level = 3  # errors only: ONNX Runtime's warnings go to fd 2 from C++
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own exception types, one per status code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"ONNX Runtime cannot load '{path}' ({reason}): the file is truncated, corrupt or not an ONNX model; "
            "export it again"
        ) from exc
    specs = [_tensor_spec(i) for i in session.get_inputs()]
    where = f"the ONNX model '{path}'"

    def run(*args: torch.Tensor):
        check_count(where, specs, len(args))
        for spec, arg in zip(specs, args):
            check_tensor(where, spec, arg, shape_hint=_static_hint)
        feeds = {s.name: a.detach().cpu().numpy() for s, a in zip(specs, args)}
        outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


_ONNX_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def _tensor_spec(arg) -> TensorSpec:
    """An ONNX Runtime input (``NodeArg``) as a spec; a symbolic dim (a name or None) takes any size."""
    return TensorSpec(arg.name, _ONNX_TYPES.get(arg.type), tuple(d if isinstance(d, int) else None for d in arg.shape))


def _static_hint(spec: TensorSpec, dims: list[int]) -> str:
    return (
        "qgraph.export_onnx keeps the example's sizes in every dim but the batch: "
        "export again with an example of the size you run."
    )
