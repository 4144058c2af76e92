"""x86 quantizer rules: uint8 affine activations, 7-bit symmetric per-channel weights, int32 bias.

These are the specs x86 integer kernels run fast (ONNX Runtime's CPU provider, oneDNN):

* activations: uint8 in ``[0, 255]``, affine, one scale per tensor. Without AVX-512 VNNI
  the fast int8 GEMM path multiplies *unsigned* activations by *signed* weights (U8S8
  ``vpmaddubsw``); int8 activations fall back to slower kernels.
* weights: int8 restricted to 7 bits, ``[-63, 63]``, symmetric, per output channel. The
  U8S8 instruction adds pairs of ``u8 × s8`` products into an int16 that saturates when
  both factors are near full range (255 × 127 × 2 > 32767); 7-bit weights keep every pair
  sum in range (ONNX Runtime's "reduce_range"). Measured here: full-range weights put a
  small CNN 22 output steps off its Q/DQ reference, 7-bit ones 2.
* bias: int32 with ``scale = input scale × weight scale`` and zero point 0, so that
  ``DQ → Conv → Q`` with an int32 bias fuses into ``QLinearConv`` (and ``MatMul`` into
  ``QLinearMatMul`` / ``QGemm``).

Layer norm and softmax have no rule: they stay float between quantized neighbours.
"""

from __future__ import annotations

import torch

from qgraph.backends.rules.base import BASE_RULES, DYNAMIC_EPS
from qgraph.quant.rules import Backend, QuantScheme
from qgraph.quant.specs import Int32Bias, PerChannel, PerTensor, PerToken, QuantSpec


def x86_scheme(is_qat: bool = False, weight_bits: int = 7, act_bits: int = 8) -> QuantScheme:
    """The x86 scheme: uint8 activations, ``weight_bits``-bit symmetric weights, int32 bias."""
    act = QuantSpec(
        dtype=torch.uint8,
        bits=act_bits,
        symmetric=False,
        observer="moving_average_minmax" if is_qat else "minmax",
        averaging_constant=0.01,
    )
    weight = QuantSpec(
        dtype=torch.int8,
        bits=weight_bits,
        symmetric=True,
        narrow_range=True,
        granularity=PerChannel(axis=0),
        observer="moving_average_minmax",
        averaging_constant=1.0,
    )
    return QuantScheme(activation=act, weight=weight, bias=Int32Bias())


def x86_dynamic_scheme(per_token: bool = False) -> QuantScheme:
    """Dynamic x86: uint8 affine activations chosen per batch, 7-bit weights as in :func:`x86_scheme`.

    This is ONNX Runtime's ``quantize_dynamic`` form: ``DynamicQuantizeLinear`` picks the uint8
    range of each input at run time and ``MatMulInteger`` / ``ConvInteger`` multiply by the int8
    weights; the bias is added in float after rescaling, so it is not quantized.
    ``per_token=True`` picks one int8 range per row instead (the per-token ops are int8 only;
    ONNX Runtime has no per-row integer kernel, so that form is exported as float math).
    """
    act = QuantSpec(
        dtype=torch.int8 if per_token else torch.uint8,
        symmetric=False,
        granularity=PerToken() if per_token else PerTensor(),
        dynamic=True,
        eps=DYNAMIC_EPS,
    )
    return QuantScheme(activation=act, weight=x86_scheme().weight, bias=None)


# The base table as it is: matmul quantized and mul alone, as torchao's X86InductorQuantizer
# annotates them (it fuses no relu after mul).
X86 = Backend(name="x86", rules=BASE_RULES, default_scheme=x86_scheme, dynamic_scheme=x86_dynamic_scheme)
