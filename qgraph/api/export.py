"""Write a converted model as an ExecuTorch ``.pte`` or an ONNX QDQ model, and load them back.

Files are written atomically: a failure leaves no partial file and an existing file intact.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.fx

from qgraph.api.capture import batch_dynamic_shapes
from qgraph.api.inputs import check_call, split_inputs
from qgraph.backends.executorch import emitter as executorch_emitter
from qgraph.backends.executorch.emitter import PteReport
from qgraph.backends.executorch.lowbit import UseEmbeddingKernels, group_weight_blocker
from qgraph.backends.onnx import emitter as onnx_emitter
from qgraph.backends.onnx import interface as onnx_interface
from qgraph.core.errors import ConfigError, ExportError, QGraphError
from qgraph.core.files import check_writable
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import CONVERTED_KEY, PREPARED_KEY
from qgraph.core.node_info import describe_node, failing_node, origin_name
from qgraph.core.pass_manager import PassManager
from qgraph.core.version import __version__
from qgraph.passes.export.fold_bias_dequantize import FoldBiasDequantize
from qgraph.passes.export.lower_dynamic_to_integer import LowerDynamicToInteger
from qgraph.passes.export.shift_uint8_to_int8 import ShiftUint8ToInt8
from qgraph.passes.lora.add_lora import pte_blocker


def _check_converted(model: torch.nn.Module) -> None:
    if isinstance(model, torch.fx.GraphModule) and PREPARED_KEY in model.meta:
        raise ConfigError("this model is prepared, not converted: call qgraph.convert(prepared) before exporting")


def _export_inputs(fn: str, model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike) -> tuple:
    """The example inputs as ``(args, kwargs)``, checked against what ``model`` was captured
    with, after checking that ``path`` can be written: both fail before any export work."""
    check_writable(path)
    args, kwargs = split_inputs(example_inputs)
    return check_call(model, args, kwargs, where=f"the model ({fn}'s example inputs)")


def _failed_at_node(fn: str, runtime: str, exc: Exception, path: str | os.PathLike) -> Exception:
    """An :class:`ExportError` naming the node the exporter failed on, or ``exc`` itself.

    ExecuTorch's ``to_edge`` verifier and ``torch.onnx``'s translator raise about an operator
    (an op outside the core ATen set with no decomposition, an op with no ONNX function); the
    node they were at tells the user which layer of the model it is.
    """
    node = failing_node(exc)
    if node is None:
        return exc
    innermost = exc
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    reason = next((ln.strip() for ln in str(innermost).splitlines() if ln.strip()), type(innermost).__name__)
    return ExportError(
        f"{fn}: node {describe_node(node, origin_name(node))} has no path to {runtime}: {reason.rstrip('.')}.\n"
        f"Nothing was written to '{path}'. Replace that op in the model, or keep the layer out of the exported part."
    )


def export_pte(quantized: torch.nn.Module, example_inputs: Any, path: str | os.PathLike) -> PteReport:
    """Lower ``quantized`` to ExecuTorch with the XNNPACK delegate and write ``path``.

    Both backends' models export: an x86 model is first rewritten by
    :func:`lower_for_xnnpack` (uint8 → int8 activations, float biases), which changes no
    output value.

    Returns a :class:`PteReport` (size, and the ops inside and outside the delegate). The
    program has the static shapes of ``example_inputs``.
    """
    _check_converted(quantized)
    if isinstance(quantized, torch.fx.GraphModule):
        if (why := pte_blocker(quantized)) is not None:
            raise ConfigError(f"export_pte: {why}")
        if (why := group_weight_blocker(quantized)) is not None:
            raise ConfigError(f"export_pte: {why}")
    args, kwargs = _export_inputs("export_pte", quantized, example_inputs, path)
    if isinstance(quantized, torch.fx.GraphModule):
        quantized = lower_for_xnnpack(quantized)
    program = torch.export.export(quantized, args, kwargs)
    try:
        return executorch_emitter.write_pte(program, path)
    except Exception as exc:  # the verifier's SpecViolationError, or any failure at a node
        raise _failed_at_node("export_pte", "ExecuTorch", exc, path) from exc


def lower_for_xnnpack(quantized: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``quantized`` in the int8 form ExecuTorch's XNNPACK delegate runs.

    uint8 activations (x86 scheme) become the same grid in int8 (zero point - 128), and
    int32 biases become the float biases the delegate quantizes itself with the same scale:
    both exact, so the ``.pte`` computes what the converted model does. Quantized embedding
    tables become ExecuTorch's ``embedding_byte`` / ``embedding_4bit`` kernels (same values).
    A model quantized for XNNPACK passes through unchanged.
    """

    passes = [ShiftUint8ToInt8(), FoldBiasDequantize(), UseEmbeddingKernels()]
    return PassManager(passes, stage="export_pte")(copy_graph_module(quantized))


def export_onnx(
    quantized: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
) -> str:
    """Write ``quantized`` as an ONNX QDQ model with a dynamic batch axis; returns the path.

    The file's interface does not depend on the quantization scheme: inputs are named after
    the model's ``forward`` arguments (``input_names`` to choose), outputs ``output`` or
    ``output_0`` ... (``output_names``), and the dynamic batch axis ``batch`` (it stays static
    when the example batch is 1: ``torch.export`` specializes it). ``opset`` defaults to 20,
    or 21 where group-wise weights need it. ``metadata_props`` carry ``qgraph.version``,
    ``qgraph.backend``, ``qgraph.scheme`` (a summary of the quantized tensors),
    ``qgraph.opset`` and ``qgraph.exporter``; the file passes ``onnx.checker.check_model``
    with ``full_check=True``.

    Dynamically quantized linears and convs are written in ONNX Runtime's
    ``quantize_dynamic`` form (``DynamicQuantizeLinear`` + ``MatMulInteger`` /
    ``ConvInteger``), see :func:`lower_for_onnx`.
    """
    _check_converted(quantized)
    properties = {
        "qgraph.version": __version__,
        "qgraph.backend": _backend_of(quantized),
        "qgraph.scheme": onnx_interface.quantization_summary(quantized),
    }
    args, kwargs = _export_inputs("export_onnx", quantized, example_inputs, path)
    args = (*args, *kwargs.values())  # the graph's forward takes keyword inputs by position too
    if isinstance(quantized, torch.fx.GraphModule):
        quantized = lower_for_onnx(quantized)
    try:
        return onnx_emitter.write_onnx(
            quantized,
            args,
            batch_dynamic_shapes(args),
            path,
            input_names=input_names,
            output_names=output_names,
            opset=opset,
            properties=properties,
        )
    except QGraphError:
        raise
    except Exception as exc:  # torch.onnx's ConversionError, or any failure at a node
        raise _failed_at_node("export_onnx", "ONNX", exc, path) from exc


def _backend_of(model: torch.nn.Module) -> str:
    """The backend whose rules quantized ``model`` (``none`` for a model qgraph did not convert)."""
    converted = model.meta.get(CONVERTED_KEY) if isinstance(model, torch.fx.GraphModule) else None
    return converted["backend"] if converted else "none"


def lower_for_onnx(quantized: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``quantized`` whose dynamic layers are single integer ops (same outputs).

    The ONNX emitter writes them as ``DynamicQuantizeLinear → MatMulInteger / ConvInteger``;
    a model without dynamic layers passes through unchanged.
    """

    return PassManager([LowerDynamicToInteger()], stage="export_onnx")(copy_graph_module(quantized))


def load_pte(path: str | os.PathLike) -> Callable[..., Any]:
    """Run a ``.pte`` in the ExecuTorch runtime: ``load_pte(p)(x) -> tensor``."""
    return executorch_emitter.load_pte(path)


def load_onnx(path: str | os.PathLike, optimize: bool = True, spin: bool = True) -> Callable[..., Any]:
    """Run an ``.onnx`` in ONNX Runtime: ``load_onnx(p)(x) -> tensor`` (options: see
    :func:`qgraph.backends.onnx.emitter.load_onnx`)."""
    return onnx_emitter.load_onnx(path, optimize=optimize, spin=spin)
