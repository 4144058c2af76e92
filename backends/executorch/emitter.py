"""Emit an ExecuTorch program (``.pte``) with the XNNPACK delegate, and run one.

``torch.export`` the converted Q/DQ graph, then ``to_edge_transform_and_lower`` with
``XnnpackPartitioner``: XNNPACK takes every ``dq → op → q`` pattern it has an integer
kernel for (and fp32 ops it supports), the rest runs on ExecuTorch's portable kernels.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tabulate import tabulate

from qgraph.core.errors import InputError, ModelFileError
from qgraph.core.files import atomic_write_bytes, read_head
from qgraph.core.inputs import TensorSpec, check_count, check_tensor
from qgraph.core.opsets import BOOKKEEPING_OPS
from qgraph.core.quiet import quiet


@dataclass
class PteReport:
    """What went into a ``.pte``: path, size and where its ops run.

    ``delegated`` / ``not_delegated`` count compute ops inside the XNNPACK delegate and on
    ExecuTorch's portable or quantized kernels, per op (ExecuTorch's names, e.g.
    ``aten_convolution_default``). ``bookkeeping`` counts nodes that run no kernel
    (:data:`~qgraph.core.opsets.BOOKKEEPING_OPS`: the ``getitem`` that unpacks a delegate's
    outputs), which are neither. ``str(report)`` is a short table.
    """

    path: str
    size_bytes: int
    delegated: Counter = field(default_factory=Counter)
    not_delegated: Counter = field(default_factory=Counter)
    bookkeeping: Counter = field(default_factory=Counter)

    @property
    def delegated_fraction(self) -> float:
        """Share of the compute ops that run inside the delegate."""
        total = sum(self.delegated.values()) + sum(self.not_delegated.values())
        return sum(self.delegated.values()) / total if total else 0.0

    def __str__(self) -> str:
        inside, outside = sum(self.delegated.values()), sum(self.not_delegated.values())
        head = (
            f"{self.path}: {self.size_bytes / 1024:.1f} KiB; {inside} of {inside + outside} compute ops "
            f"inside the XNNPACK delegate ({100 * self.delegated_fraction:.1f} %)"
        )
        ops = sorted(
            {*self.delegated, *self.not_delegated},
            key=lambda op: (-self.not_delegated[op], -self.delegated[op], op),
        )
        rows = [[op, self.delegated[op] or "", self.not_delegated[op] or ""] for op in ops]
        text = head + "\n" + tabulate(rows, headers=["op", "in XNNPACK", "outside"], disable_numparse=True)
        if self.bookkeeping:
            counts = ", ".join(f"{op} x{n}" for op, n in sorted(self.bookkeeping.items()))
            text += f"\nno kernel (bookkeeping): {counts}"
        return text


def lower(program: torch.export.ExportedProgram):
    """``EdgeProgramManager`` with the XNNPACK partitioner applied.

    Quantize / dequantize ops the delegate does not take (uint8 activations, int32 biases of
    the x86 scheme) run on ExecuTorch's quantized kernels, whose out-variants
    ``executorch.kernels.quantized`` registers.
    """
    import executorch.kernels.quantized  # noqa: F401
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(program, partitioner=[_xnnpack_partitioner()])


def _xnnpack_partitioner():
    """ExecuTorch's ``XnnpackPartitioner``, except that a constant pad of dequantized codes
    stays out of the delegate.

    XNNPACK's pad is float-only in the partitioner's own rules, yet it takes a pad whose
    input is a dequantize, and after its channels-last pass the program fails to load
    (``xnn_status_invalid_parameter`` creating ``StaticConstantPad``): Swin's window and
    patch-merging pads, with qgraph's and with torchao's quantizers alike. Kept out, the pad
    runs on ExecuTorch's portable kernels between the delegate's integer layers.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import ConstantPadConfig, why
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant

    class FloatConstantPadConfig(ConstantPadConfig):
        def check_constraints(self, node: torch.fx.Node, ep) -> bool:
            if is_dequant(node.args[0]):
                why(node, reason="qgraph: XNNPACK fails to load a pad of dequantized codes")
                return False
            return super().check_constraints(node, ep)

    configs = [FloatConstantPadConfig if config is ConstantPadConfig else config for config in ALL_PARTITIONER_CONFIGS]
    return XnnpackPartitioner(configs=configs)


def delegation_counts(edge) -> tuple[Counter, Counter, Counter]:
    """Per-op counts of compute nodes inside and outside the delegate, and of bookkeeping
    nodes (anywhere). Ops are classified by op object; they are keyed by ExecuTorch's names
    (the node name without its ``_<n>`` suffix, as ``get_delegation_info`` writes them)."""
    from executorch.exir.delegate import executorch_call_delegate
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    gm = edge.exported_program().graph_module
    inside, outside, bookkeeping = Counter(), Counter(), Counter()

    def count(node: torch.fx.Node, compute: Counter) -> None:
        (bookkeeping if node.target in BOOKKEEPING_OPS else compute)[re.sub(r"_\d+$", "", node.name)] += 1

    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(lowered := getattr(gm, str(node.target)), LoweredBackendModule):
            for inner in lowered.original_module.graph.nodes:
                if inner.op == "call_function":
                    count(inner, inside)
        elif node.op == "call_function" and node.target is not executorch_call_delegate:
            count(node, outside)
    return inside, outside, bookkeeping


def write_pte(program: torch.export.ExportedProgram, path: str | os.PathLike) -> PteReport:
    with quiet():
        edge = lower(program)
        counts = delegation_counts(edge)
        buffer = edge.to_executorch().buffer
    atomic_write_bytes(path, buffer)
    return PteReport(str(path), len(buffer), *counts)


def load_pte(path: str | os.PathLike) -> Callable[..., Any]:
    """A callable that runs ``forward`` of the ``.pte`` in the ExecuTorch runtime.

    The file is checked before the runtime sees it (missing, empty, not an ExecuTorch program,
    shorter than its header says), and a program the runtime still refuses raises
    :class:`ModelFileError` naming the path. The callable checks its inputs' number, dtypes
    and sizes against the program's method meta before running it.

    Loading runs under :func:`~qgraph.core.quiet.quiet` with ``native_stderr``: the
    runtime's C++ log lines (its CPU probe when the runtime starts) stay off stderr unless
    loading fails. Calls are left alone: a successful ``execute`` writes nothing, a failing
    one should be heard, and redirecting stderr costs tens of microseconds per call
    (measured here: more than a small program's whole ``execute``), which every latency
    figure would carry.
    """
    _check_pte_file(path)
    with quiet(native_stderr=True):
        from executorch.runtime import Runtime

        try:
            method = Runtime.get().load_program(str(path)).load_method("forward")
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelFileError(
                f"the ExecuTorch runtime cannot load '{path}' ({exc}): the file is corrupt or was written by "
                "another ExecuTorch version; export it again"
            ) from exc
    meta = method.metadata
    specs = [_tensor_spec(f"input{i}", meta.input_tensor_meta(i)) for i in range(meta.num_inputs())]
    where = f"the ExecuTorch program '{path}'"

    def run(*args: torch.Tensor):
        check_count(where, specs, len(args))
        for spec, arg in zip(specs, args):
            check_tensor(where, spec, arg, shape_hint=_static_hint, sizes_are_bounds=True)
        try:
            outputs = method.execute([a.contiguous() for a in args])
        except RuntimeError as exc:
            if all(tuple(a.shape) == spec.shape for a, spec in zip(args, specs)):
                raise
            # a size under the planned one, which a program with static shapes refuses
            got = ", ".join(str(list(a.shape)) for a in args)
            raise InputError(
                f"{where} does not take inputs of shape {got}; it takes ({', '.join(map(str, specs))}). "
                f"{_static_hint(specs[0], [])}"
            ) from exc
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


# ExecuTorch's ScalarType codes (runtime/core/portable_type/scalar_type.h), as in c10.
_SCALAR_TYPES = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    11: torch.bool,
    15: torch.bfloat16,
}
_PTE_IDENTIFIER = slice(4, 6)
"""A program is a flatbuffer whose file identifier, bytes 4-7, is ``ET`` and a version (``ET12``)."""


def _tensor_spec(name: str, info) -> TensorSpec:
    return TensorSpec(name, _SCALAR_TYPES.get(info.dtype()), tuple(info.sizes()))


def _static_hint(spec: TensorSpec, dims: list[int]) -> str:
    return (
        "qgraph.export_pte writes a program with the static shapes of its example inputs: "
        "export again with an example of the shape you run."
    )


def _check_pte_file(path: str | os.PathLike) -> None:
    """Raise :class:`ModelFileError` for a file the runtime would refuse with a bare error code.

    After the flatbuffer identifier (``ET12``) a program written with segments has an
    extended header: ``eh00``, its length (uint32), the flatbuffer size and the segments'
    offset and size (uint64 each, little-endian); a file shorter than they add up to is
    truncated.
    """
    head, size = read_head(path, "ExecuTorch program")
    if head[_PTE_IDENTIFIER] != b"ET":
        also = " (an ONNX model loads with qgraph.load_onnx)" if str(path).endswith(".onnx") else ""
        raise ModelFileError(
            f"'{path}' is not an ExecuTorch program: bytes 4-7 are {head[4:8]!r}, not the 'ET..' identifier{also}"
        )
    if head[8:12] == b"eh00" and len(head) >= 40:
        length = int.from_bytes(head[12:16], "little")
        program, offset = int.from_bytes(head[16:24], "little"), int.from_bytes(head[24:32], "little")
        segments = int.from_bytes(head[32:40], "little") if length >= 32 else 0
        expected = max(program, offset + segments)
        if size < expected:
            raise ModelFileError(
                f"'{path}' is truncated: its header says {expected} bytes, the file has {size}; export it again"
            )
