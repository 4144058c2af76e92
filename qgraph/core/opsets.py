"""The operator vocabulary: every set of ATen and ``quantized_decomposed`` overloads qgraph names.

Passes, rules, lowerings and tools match nodes by op object (``aten.conv2d.default``), never
by name, and they take their sets from here, so that "what is a conv" or "what is a
dequantize" has one answer in the whole code base (a test fails on a set defined anywhere
else). qgraph's own custom ops (``torch.ops.qgraph.*``, ``torch.ops.qgraph_ref.*``) are
named in the :mod:`qgraph.ops` module that registers them.

Importing this module registers the ``quantized_decomposed`` ops (torch's
``torch.ao.quantization.fx._decomposed``), which ExecuTorch and the ONNX exporter read.
"""

from __future__ import annotations

import operator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

# --- layers with weights -----------------------------------------------------------------

CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default})
LINEAR_OPS = frozenset({aten.linear.default})
MATMUL_OPS = frozenset({aten.matmul.default, aten.bmm.default})
"""Products of two activations that backends quantize (attention scores, ``x @ y``)."""
MM_OPS = frozenset({aten.mm.default})
"""A plain 2-D product: counted as compute by ``coverage``; no backend rule quantizes it."""
EMBEDDING_OPS = frozenset({aten.embedding.default})
BATCH_NORM_OPS = frozenset({aten.batch_norm.default})

# --- element-wise and activations -------------------------------------------------------

ADD_OPS = frozenset({aten.add.Tensor, aten.add_.Tensor})
MUL_OPS = frozenset({aten.mul.Tensor, aten.mul_.Tensor})
DIV_OPS = frozenset({aten.div_.Tensor, aten.div_.Scalar, aten.div.Tensor, aten.div.Scalar})
CAT_OPS = frozenset({aten.cat.default, aten.concat.default})
RELU_OPS = frozenset({aten.relu.default, aten.relu_.default})
HARDTANH_OPS = frozenset({aten.hardtanh.default, aten.hardtanh_.default})
ACTIVATION_OPS = RELU_OPS | HARDTANH_OPS
"""Activations XNNPACK and ONNX Runtime fuse into the op before them (ReLU, ReLU6 = hardtanh(0, 6))."""
HARDSWISH_OPS = frozenset({aten.hardswish.default, aten.hardswish_.default})
ATTENTION_OPS = frozenset({aten.scaled_dot_product_attention.default})

# --- pooling ---------------------------------------------------------------------------

MAX_POOL_OPS = frozenset({aten.max_pool2d.default, aten.max_pool1d.default})
AVG_POOL_OPS = frozenset({aten.avg_pool2d.default, aten.avg_pool1d.default})
ADAPTIVE_AVG_POOL_OPS = frozenset({aten.adaptive_avg_pool2d.default})
MEAN_OPS = frozenset({aten.mean.dim, aten.mean.default})
AVERAGING_OPS = AVG_POOL_OPS | ADAPTIVE_AVG_POOL_OPS | MEAN_OPS

# --- data movement ---------------------------------------------------------------------

SHAPE_OPS = frozenset(
    {
        aten.flatten.using_ints,
        aten.reshape.default,
        aten.view.default,
        aten.permute.default,
        aten.transpose.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.contiguous.default,  # channel shuffle: view → transpose → contiguous → view
        aten.slice.Tensor,  # channel split (chunk / split, see passes/prepare/chunk_to_slices.py)
    }
)
"""Ops that move elements without arithmetic: on integers they give the same codes as on
the values they stand for, so they share their input's qparams."""
DATA_MOVEMENT_OPS = SHAPE_OPS | {aten.clone.default}
"""Shape ops and copies: the integer reference runs them on codes."""
SPLIT_OPS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default})

# --- bookkeeping -----------------------------------------------------------------------

BOOKKEEPING_OPS = frozenset(
    {
        operator.getitem,  # one output of a multi-output op or of a delegate call
        aten.sym_size.int,
        aten.sym_numel.default,
        aten.sym_stride.int,
        aten._assert_scalar.default,
        aten._assert_tensor_metadata.default,
    }
)
"""Nodes that run no kernel: they pick an element of a tuple or read or check a shape. An
export report counts them apart from the compute it places inside or outside a delegate."""

# --- train-only ops --------------------------------------------------------------------

DROPOUT_OPS = frozenset({aten.dropout.default, aten.dropout_.default})
"""Identity in eval mode, ``(x, p, train)``; qgraph's stochastic depth joins them in
:data:`qgraph.ops.stochastic_depth.EVAL_IDENTITY_OPS`."""
EMPTY_OPS = frozenset({aten.empty.memory_format})
BERNOULLI_OPS = frozenset({aten.bernoulli_.float, aten.bernoulli.p})
"""The mask of torchvision's stochastic depth: ``empty(...).bernoulli_(p)``."""

# --- quantize / dequantize (quantized_decomposed) ---------------------------------------

QUANTIZE_OPS = frozenset(
    {qd.quantize_per_tensor.default, qd.quantize_per_channel.default, qd.quantize_per_channel_group.default}
)
DEQUANTIZE_OPS = frozenset(
    {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default, qd.dequantize_per_channel_group.default}
)
"""Quantize / dequantize with constant qparams (static activations, weights)."""
PER_TENSOR_QDQ_OPS = frozenset({qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default})
PER_CHANNEL_QDQ_OPS = frozenset({qd.quantize_per_channel.default, qd.dequantize_per_channel.default})
GROUP_QDQ_OPS = frozenset({qd.quantize_per_channel_group.default, qd.dequantize_per_channel_group.default})
"""Per-group ops (``*_per_channel_group``): scales ``[rows, cols // group_size]`` of a 2-D
tensor, used for int4 weights (XNNPACK's ``qb4w``)."""
CHOOSE_PER_TENSOR_OPS = frozenset({qd.choose_qparams.tensor})
CHOOSE_QPARAMS_OPS = frozenset({qd.choose_qparams.tensor, qd.choose_qparams_per_token_asymmetric.default})
DYNAMIC_QUANTIZE_OPS = frozenset({qd.quantize_per_tensor.tensor, qd.quantize_per_token.default})
DYNAMIC_DEQUANTIZE_OPS = frozenset({qd.dequantize_per_tensor.tensor, qd.dequantize_per_token.default})
"""Dynamic quantization: ``choose_qparams`` picks the range of each batch at run time and the
``.tensor`` / ``per_token`` quantize ops take its scale and zero point as tensors. Kept apart
from ``QUANTIZE_OPS`` / ``DEQUANTIZE_OPS``, whose qparams are constants."""
PER_TENSOR_DYNAMIC_QDQ_OPS = frozenset({qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor})
PER_TENSOR_DYNAMIC_CHAIN = (qd.choose_qparams.tensor, qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor)
PER_TOKEN_DYNAMIC_CHAIN = (
    qd.choose_qparams_per_token_asymmetric.default,
    qd.quantize_per_token.default,
    qd.dequantize_per_token.default,
)
"""``(choose, quantize, dequantize)`` of a dynamic input, per tensor and per token."""
