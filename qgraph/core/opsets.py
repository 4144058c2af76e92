"""The operator vocabulary: sets of ATen and ``quantized_decomposed`` overloads qgraph names.

Passes, rules, lowerings and tools match nodes by op object, never by name, and take their
sets from one place so that "what is a dequantize" has one answer in the whole code base.

Importing this module registers the ``quantized_decomposed`` ops (torch's
``torch.ao.quantization.fx._decomposed``), which ExecuTorch and the ONNX exporter read.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

qd = torch.ops.quantized_decomposed

# --- quantize / dequantize (quantized_decomposed) ---------------------------------------

QUANTIZE_OPS = frozenset(
    {qd.quantize_per_tensor.default, qd.quantize_per_channel.default, qd.quantize_per_channel_group.default}
)
DEQUANTIZE_OPS = frozenset(
    {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default, qd.dequantize_per_channel_group.default}
)
"""Quantize / dequantize with constant qparams (static activations, weights)."""
DYNAMIC_QUANTIZE_OPS = frozenset({qd.quantize_per_tensor.tensor, qd.quantize_per_token.default})
DYNAMIC_DEQUANTIZE_OPS = frozenset({qd.dequantize_per_tensor.tensor, qd.dequantize_per_token.default})
"""Dynamic quantization: ``choose_qparams`` picks the range of each batch at run time and the
``.tensor`` / ``per_token`` quantize ops take its scale and zero point as tensors. Kept apart
from ``QUANTIZE_OPS`` / ``DEQUANTIZE_OPS``, whose qparams are constants."""
