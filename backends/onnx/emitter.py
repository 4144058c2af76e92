"""Emit an ONNX model in QDQ form and run it in ONNX Runtime.

``torch.onnx.export(dynamo=True)`` maps ``quantized_decomposed.quantize_per_*`` /
``dequantize_per_*`` to ``QuantizeLinear`` / ``DequantizeLinear``; ONNX Runtime's graph
optimizer then fuses ``DQ → Conv → Q`` into integer kernels. The batch axis stays dynamic.

Dynamic quantization has no ONNX translation in ``torch.onnx``; :func:`dynamic_translations`
supplies them (see :mod:`qgraph.backends.onnx.dynamic`); group-wise int4 / int8 weights
become opset-21 blocked ``DequantizeLinear`` (:mod:`qgraph.backends.onnx.lowbit`). A spatial
mean of uint8 codes becomes ``GlobalAveragePool``, which ONNX Runtime fuses into an integer kernel
(:mod:`qgraph.backends.onnx.global_pool`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import torch

from qgraph.backends.onnx.dynamic import dynamic_translations
from qgraph.backends.onnx.global_pool import use_global_average_pool
from qgraph.backends.onnx.lowbit import group_translations, needs_opset
from qgraph.core.errors import ModelFileError
from qgraph.core.files import atomic_path, read_head
from qgraph.core.inputs import TensorSpec, check_count, check_tensor


def write_onnx(model: torch.nn.Module, args: Sequence[Any], dynamic_shapes: Any, path: str | os.PathLike) -> str:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            tuple(args),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            optimize=True,
            custom_translation_table={**dynamic_translations(), **group_translations()},
            opset_version=needs_opset(model),
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        if use_global_average_pool(proto):
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
    return str(path)


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
