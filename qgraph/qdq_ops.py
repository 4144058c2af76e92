"""The ``quantized_decomposed`` quantize / dequantize ops that ExecuTorch and ONNX understand.

Importing this module registers them (they live in ``torch.ao.quantization.fx._decomposed``).
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

qd = torch.ops.quantized_decomposed

QUANTIZE_OPS = frozenset({qd.quantize_per_tensor.default, qd.quantize_per_channel.default})
DEQUANTIZE_OPS = frozenset({qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default})
