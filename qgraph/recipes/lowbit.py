"""Low-bit schemes for language models: 8da4w, int4 weight-only, quantized embeddings.

    scheme = qgraph.int8_dynamic_int4_weight(group_size=32)          # "8da4w"
    prepared = qgraph.prepare_qat(model, (tokens,), config=qgraph.QConfig(scheme=scheme))
    ... fine-tune ...
    q = qgraph.convert(prepared)
    qgraph.export_pte(q, (tokens,), "llm.pte")       # every linear in XNNPACK's qd8-f32-qb4w kernel

Each function returns a :class:`~qgraph.QuantScheme`, the unit a :class:`~qgraph.QConfig`
places globally, per module name, per module type or per operator, like the backends'
default and dynamic schemes. What they put on a layer:

* :func:`int8_dynamic_int4_weight` ("8da4w", torchao's
  ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, PerGroup(g))``):

  - weights: int4 in ``[-8, 7]``, symmetric, one scale per group of ``group_size``
    consecutive input features of each output row: ``s[o, j] = max|W[o, jg:(j+1)g]| / 7.5``,
    ``q = clamp(round(W / s), -8, 7)``. Scales are rounded to bfloat16, the precision in which
    XNNPACK stores them, so the converted graph and the ``.pte`` use identical weights.
  - activations: int8 affine, one range per token (row of the linear's input), chosen at run
    time (``choose_qparams_per_token_asymmetric``): nothing to calibrate, outputs stay float.
  - only linears take it: a rule without a dynamic form (add, mul, matmul, ...) refuses a
    dynamic scheme, and a conv's weight is not 2-D, which group-wise scales need.

  In QAT the weight is fake-quantized per group and the input per token, both with the
  straight-through estimator; ``convert`` emits ``choose_qparams_per_token_asymmetric →
  quantize_per_token → dequantize_per_token`` on the input and ``dequantize_per_channel_group``
  on an int4-valued int8 weight: the pattern ExecuTorch's XNNPACK partitioner delegates as a
  dynamically quantized linear, and that :mod:`qgraph.backends.onnx.lowbit` writes as ONNX.

* :func:`int4_weight_only`: the same weights, float activations (``activation=None``).
  ONNX Runtime fuses ``DequantizeLinear(int4, block_size) → MatMul`` into ``MatMulNBits``;
  ExecuTorch's XNNPACK has no kernel for it and :func:`qgraph.export_pte` refuses it (use
  8da4w for a ``.pte``). A weight-only scheme placed globally also quantizes embedding
  tables; ``QConfig.set_operator(torch.ops.aten.embedding.default, None)`` keeps them float
  (:func:`llm_config` does).
* :func:`embedding_weight_only`: int8 or int4 symmetric embedding tables, per row or per
  group of the embedding dimension; the ``.pte`` runs them as ExecuTorch's
  ``quantized_decomposed::embedding_byte`` / ``embedding_4bit`` kernels.

A group size must divide a layer's input features (the annotate pass refuses, with that
reason, a layer it does not divide, which then stays float); XNNPACK takes multiples of 32.
"""

from __future__ import annotations

import torch

from qgraph.core.errors import ConfigError
from qgraph.quant.config import QConfig
from qgraph.quant.rules import QuantScheme
from qgraph.quant.specs import PerChannel, PerGroup, QuantSpec
from qgraph.recipes.dynamic import dynamic_scheme

aten = torch.ops.aten

GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes the acceptance tests cover; XNNPACK takes any multiple of 32."""


def int4_weight_spec(group_size: int = 32, bits: int = 4, scale_dtype: torch.dtype = torch.bfloat16) -> QuantSpec:
    """Symmetric ``bits``-bit group-wise weights in ``[-2^(b-1), 2^(b-1) - 1]`` (torchao's range).

    The range is that of the current weight (``averaging_constant=1``), in QAT as well, so a
    weight the optimizer just grew is never clipped by a stale range.
    """
    return QuantSpec(
        dtype=torch.int8,
        bits=bits,
        symmetric=True,
        granularity=PerGroup(group_size),
        observer="moving_average_minmax",
        averaging_constant=1.0,
        scale_dtype=scale_dtype,
    )


def _check_group_size(group_size: int, backend: str) -> None:
    if not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"group_size={group_size!r} must be an integer of at least 2")
    if backend == "xnnpack" and group_size % 32:
        raise ConfigError(
            f"group_size={group_size}: XNNPACK's int4 group-wise kernels take multiples of 32 (e.g. 32, 64, 128, 256)"
        )


def int8_dynamic_int4_weight(group_size: int = 32, backend: str = "xnnpack") -> QuantScheme:
    """8da4w: int4 group-wise symmetric weights, int8 per-token dynamic activations.

    ``backend`` picks the per-token activation spec of that backend (both are int8 affine,
    XNNPACK's ``qd8`` formula) and, for ``"xnnpack"``, checks that the group size is one its
    kernels take.
    """
    _check_group_size(group_size, backend)
    activation = dynamic_scheme(backend, per_token=True).activation
    return QuantScheme(activation=activation, weight=int4_weight_spec(group_size), bias=None)


def int4_weight_only(group_size: int = 32) -> QuantScheme:
    """int4 group-wise symmetric weights, float activations (ONNX Runtime's ``MatMulNBits``)."""
    _check_group_size(group_size, "")
    return QuantScheme(activation=None, weight=int4_weight_spec(group_size), bias=None)


def embedding_weight_only(bits: int = 4, group_size: int | None = 32) -> QuantScheme:
    """Weight-only embedding table: ``bits`` (8 or 4) symmetric, per group of ``group_size``
    elements of the embedding dimension, or per row (``group_size=None``).

    ExecuTorch's ``embedding_byte`` / ``embedding_4bit`` kernels take scales in float, so
    they are not rounded to bf16 here.
    """
    if bits not in (4, 8):
        raise ConfigError(f"embedding_weight_only(bits={bits}): ExecuTorch's embedding kernels take 8 or 4 bits")
    if group_size is None:
        spec = QuantSpec(
            dtype=torch.int8,
            bits=bits,
            symmetric=True,
            granularity=PerChannel(axis=0),
            observer="moving_average_minmax",
            averaging_constant=1.0,
        )
    else:
        _check_group_size(group_size, "")
        spec = int4_weight_spec(group_size, bits=bits, scale_dtype=torch.float32)
    return QuantScheme(activation=None, weight=spec, bias=None)


def llm_config(
    group_size: int = 32, embedding_bits: int | None = None, backend: str = "xnnpack", weight_only: bool = False
) -> QConfig:
    """The usual LLM preset: 8da4w (or int4 weight-only) linears, optionally a quantized
    embedding table (``embedding_bits`` 8 or 4, same group size), everything else float."""
    scheme = int4_weight_only(group_size) if weight_only else int8_dynamic_int4_weight(group_size, backend)
    config = QConfig(scheme=scheme)
    embedding = None if embedding_bits is None else embedding_weight_only(embedding_bits, group_size)
    return config.set_operator(aten.embedding.default, embedding)
