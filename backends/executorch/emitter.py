"""Emit an ExecuTorch program (``.pte``) with the XNNPACK delegate, and run one.

``torch.export`` the converted Q/DQ graph, then ``to_edge_transform_and_lower`` with
``XnnpackPartitioner``: XNNPACK takes every ``dq → op → q`` pattern it has an integer
kernel for (and fp32 ops it supports), the rest runs on ExecuTorch's portable kernels.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qgraph.core.files import atomic_write_bytes


@dataclass
class PteReport:
    """What went into a ``.pte``: path, size and which ops the delegate took."""

    path: str
    size_bytes: int
    delegated: Counter = field(default_factory=Counter)
    not_delegated: Counter = field(default_factory=Counter)

    @property
    def delegated_fraction(self) -> float:
        total = sum(self.delegated.values()) + sum(self.not_delegated.values())
        return sum(self.delegated.values()) / total if total else 0.0


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


def delegation_counts(edge) -> tuple[Counter, Counter]:
    """Per-op counts of nodes inside and outside the delegate (edge-dialect op names)."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge.exported_program().graph_module)
    inside, outside = Counter(), Counter()
    for op, row in info.delegation_by_operator.items():
        if row.delegated:
            inside[op] = row.delegated
        if row.non_delegated:
            outside[op] = row.non_delegated
    return inside, outside


def write_pte(program: torch.export.ExportedProgram, path: str | os.PathLike) -> PteReport:
    edge = lower(program)
    inside, outside = delegation_counts(edge)
    buffer = edge.to_executorch().buffer
    atomic_write_bytes(path, buffer)
    return PteReport(str(path), len(buffer), inside, outside)


def load_pte(path: str | os.PathLike) -> Callable[..., Any]:
    """A callable that runs ``forward`` of the ``.pte`` in the ExecuTorch runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(*args: torch.Tensor):
        outputs = method.execute([a.contiguous() for a in args])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run
