"""torchao's PT2E QAT flow with ExecuTorch's XNNPACKQuantizer, as a test oracle.

Only tests import this (qgraph's own code never calls torchao). ``low_bit_config`` builds
the quantizer config torchao users write for sub-8-bit QAT: ``get_symmetric_quantization_config``
with narrowed ranges, per-channel symmetric weights in ``[-(2^(b-1)-1), 2^(b-1)-1]`` and
affine activations in ``[-2^(a-1), 2^(a-1)-1]`` — the same ranges as qgraph's
``xnnpack_scheme(is_qat, w_bits, a_bits)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def low_bit_config(w_bits: int, a_bits: int, is_qat: bool = True):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    w_max, a_max = 2 ** (w_bits - 1) - 1, 2 ** (a_bits - 1) - 1
    return get_symmetric_quantization_config(
        is_per_channel=True, is_qat=is_qat, act_qmin=-a_max - 1, act_qmax=a_max, weight_qmin=-w_max, weight_qmax=w_max
    )


def prepare_qat(model: nn.Module, example: tuple, w_bits: int = 8, a_bits: int = 8) -> torch.fx.GraphModule:
    """torchao's ``prepare_qat_pt2e`` on a dynamic-batch export of a copy of ``model``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    batch = torch.export.Dim("batch", min=1, max=4096)
    gm = torch.export.export(copy.deepcopy(model).train(), example, dynamic_shapes=({0: batch},)).module()
    return prepare_qat_pt2e(gm, XNNPACKQuantizer().set_global(low_bit_config(w_bits, a_bits)))


def train_mode(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import move_exported_model_to_train

    return move_exported_model_to_train(gm)


def eval_mode(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import move_exported_model_to_eval

    return move_exported_model_to_eval(gm)


def freeze_observers(gm: torch.fx.GraphModule) -> None:
    from torchao.quantization.pt2e.fake_quantize import disable_observer

    gm.apply(disable_observer)


def freeze_bn_stats(gm: torch.fx.GraphModule) -> None:
    """PT2E has no helper: turn off ``training`` of the batch-norm ops in the graph."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (
            torch.ops.aten._native_batch_norm_legit.default,
            torch.ops.aten.batch_norm.default,
        ):
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
    gm.recompile()


def convert(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e(eval_mode(gm))
