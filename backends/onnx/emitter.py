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
from qgraph.core.files import atomic_path


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
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: torch.Tensor):
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run
