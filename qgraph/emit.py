"""Write a converted model as an ExecuTorch ``.pte`` or an ONNX QDQ model, and load them back.

Files are written atomically: a failure leaves no partial file and an existing file intact.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.fx

from qgraph.backends import executorch_emitter, onnx_emitter
from qgraph.backends.executorch_emitter import PteReport
from qgraph.capture import as_args, batch_dynamic_shapes
from qgraph.errors import ConfigError


def _check_converted(model: torch.nn.Module) -> None:
    if isinstance(model, torch.fx.GraphModule) and "qgraph_prepared" in model.meta:
        raise ConfigError("this model is prepared, not converted: call qgraph.convert(prepared) before exporting")


def export_pte(quantized: torch.nn.Module, example_inputs: Any, path: str | os.PathLike) -> PteReport:
    """Lower ``quantized`` to ExecuTorch with the XNNPACK delegate and write ``path``.

    Returns a :class:`PteReport` (size, and the ops inside and outside the delegate). The
    program has the static shapes of ``example_inputs``.
    """
    _check_converted(quantized)
    backend = getattr(quantized, "meta", {}).get("qgraph_converted", {}).get("backend", "xnnpack")
    if backend != "xnnpack":
        raise ConfigError(
            f"export_pte: this model was quantized for backend '{backend}', whose uint8 / int32-bias "
            "kernels ExecuTorch's XNNPACK delegate does not run yet; prepare it with backend='xnnpack' "
            "for a .pte, or use export_onnx for this one"
        )
    args = as_args(example_inputs)
    program = torch.export.export(quantized, args)
    return executorch_emitter.write_pte(program, path)


def export_onnx(quantized: torch.nn.Module, example_inputs: Any, path: str | os.PathLike) -> str:
    """Write ``quantized`` as an ONNX QDQ model with a dynamic batch axis; returns the path."""
    _check_converted(quantized)
    args = as_args(example_inputs)
    return onnx_emitter.write_onnx(quantized, args, batch_dynamic_shapes(args), path)


def load_pte(path: str | os.PathLike) -> Callable[..., Any]:
    """Run a ``.pte`` in the ExecuTorch runtime: ``load_pte(p)(x) -> tensor``."""
    return executorch_emitter.load_pte(path)


def load_onnx(path: str | os.PathLike, optimize: bool = True) -> Callable[..., Any]:
    """Run an ``.onnx`` in ONNX Runtime: ``load_onnx(p)(x) -> tensor``."""
    return onnx_emitter.load_onnx(path, optimize=optimize)
