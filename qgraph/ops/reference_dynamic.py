"""Reference kernels of dynamically quantized layers: the range is chosen per call.

A dynamic linear / conv reads a *float* input, picks its qparams from the input's range
(for the whole tensor, or per row: "per token"), quantizes it, multiplies the integers
with an int8 / int4 weight in exact int32, and writes a *float* output::

    s, zp = qparams(min(x, 0), max(x, 0))        # per tensor or per row
    x_q   = clamp(rne(x · m) + zp)                # m = 1/s, or a division by s
    acc   = Σ_k (x_q - zp) · w_q                  # exact; per group of k for int4 groups
    y     = acc · s · s_w + bias                  # float32, in the runtime's order

The integers are exact; what differs between runtimes is how the qparams are chosen and
the float32 order of the last line. The rules, per runtime:

===================  ==========================================  ==========================================
step                 XNNPACK (``qd8`` input, ``qc8w`` / ``qb4w``)  ONNX Runtime (the ``.onnx`` qgraph writes)
===================  ==========================================  ==========================================
qparams              ``m = fl(255 / fl(r_max - r_min))`` (1 when   per tensor: ``DynamicQuantizeLinear``, uint8:
                     the range is empty), ``zp = rne(clamp(z))``   ``s = fl(fl(r_max - r_min) / 255)``,
                     with ``z`` from the end with the smaller        ``zp = rne(clamp(-r_min / s, 0, 255))``;
                     error (``xnn_f32_qd8_asymmetric_               per token: float math of
                     quantization_params``); ``s = fl(1 / m)``      ``choose_qparams_per_token_asymmetric``
quantize             ``rne(x · m) + zp``                           per tensor ``rne(x / s) + zp``; per token
                                                                   ``rne(x · fl(1 / s)) + zp``
per channel out      linear ``fma(fl(fl(acc) · s), s_w, b)``;      per tensor ``fl(fl(acc) · fl(s · s_w)) + b``;
                     conv ``fl(fl(fl(acc) · s) · s_w) + b``        per token ``fl(fl(fl(acc) · s) · s_w) + b``
per group out        ``o = Σ_g fl(fl(acc_g) · s_w,g)`` summed in    not lowered: ``MatMulNBits`` quantizes its
                     group order, then ``fl(fl(o · s) + b)``         input per block of k itself
===================  ==========================================  ==========================================

The XNNPACK per-group order is its scalar micro-kernel's (``qd8-f32-qb4w-gemm``), the
fused bias of its fully-connected one the AVX-512 kernels'. Measured on this machine
(:mod:`tests.ops.test_reference_dynamic`): the ``.pte`` of a dynamic conv + linear model and of
an 8da4w model, and the x86 ``.onnx`` (``DynamicQuantizeLinear`` → ``MatMulInteger`` /
``ConvInteger``), all equal these kernels bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from qgraph.ops.reference import _check_runtime, _exact_sum, f32, fma_f32

__all__ = ["dynamic_qparams", "dynamic_linear", "dynamic_conv"]


def dynamic_qparams(
    rows: torch.Tensor, qmin: int, qmax: int, runtime: str, per_token: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, zp, m)`` per row of ``rows`` (2-d float32): dequantize scale, zero point (int64)
    and the factor the quantize multiplies by (``nan`` where the runtime divides by ``s``)."""
    lo = rows.amin(dim=1).clamp(max=0.0)
    hi = rows.amax(dim=1).clamp(min=0.0)
    levels = f32(float(qmax - qmin))
    if runtime == "xnnpack" or per_token:
        if runtime == "xnnpack":
            m = torch.where(lo == hi, torch.ones_like(lo), levels / (hi - lo))
            lo_m, hi_m = lo * m, hi * m  # r · m: the range ends on the integer grid
        else:  # qgraph's ONNX per-token graph: s = max((hi - lo) / 255, eps), then divisions
            s = torch.clamp((hi - lo) / levels, min=torch.finfo(torch.float32).eps)
            lo_m, hi_m = lo / s, hi / s
        from_min = f32(float(qmin)) + lo_m
        from_max = f32(float(qmax)) + hi_m
        z = torch.where(from_min + from_max > 0, f32(float(qmin)) - lo_m, f32(float(qmax)) - hi_m)
        zp = torch.round(z.clamp(qmin, qmax)).to(torch.int64)
        if runtime == "xnnpack":
            return 1.0 / m, zp, m
        return s, zp, 1.0 / s
    s = (hi - lo) / levels
    zp = torch.round((f32(float(qmin)) - lo / s).clamp(qmin, qmax)).to(torch.int64)
    s = torch.where(hi == lo, torch.ones_like(s), s)  # an all-zero input: any scale gives zeros
    return s, zp, torch.full_like(s, float("nan"))


def _quantize_rows(rows: torch.Tensor, zp: torch.Tensor, s: torch.Tensor, m: torch.Tensor, qmin: int, qmax: int):
    """``x_q - zp`` (int64) of each row with its qparams, the runtime's rounding."""
    scaled = torch.where(torch.isnan(m)[:, None], rows / s[:, None], rows * m[:, None])
    q = (torch.round(scaled) + zp[:, None]).clamp(qmin, qmax)
    return q.to(torch.int64) - zp[:, None]


def _scale_and_bias(acc, s, s_w, bias, fused: bool, folded: bool = False) -> torch.Tensor:
    """The float32 tail: ``fl(fl(acc · s) · s_w) + b``; ``folded``: ``fl(acc · fl(s · s_w)) + b``;
    ``fused``: ``fma(fl(acc · s), s_w, b)`` (XNNPACK's dynamic fully-connected)."""
    if folded:
        out = acc * (s * s_w)
    else:
        out = acc * s
        if s_w is not None and fused and bias is not None:
            return fma_f32(out, s_w.expand_as(out), bias.expand_as(out))
        out = out if s_w is None else out * s_w
    return out if bias is None else out + bias


@torch.library.custom_op("qgraph_ref::dynamic_linear", mutates_args=())
def dynamic_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    group_size: int,
    per_token: bool,
    qmin: int,
    qmax: int,
    runtime: str,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``x`` quantized per call (per row when ``per_token``) and ``W``
    symmetric integers: per output channel (``w_scale [N]``, ``group_size=0``) or per group of
    ``group_size`` input features (``w_scale [N, K / group_size]``). See the module table."""
    _check_runtime(runtime)
    if group_size and runtime != "xnnpack":
        raise ValueError("per-group weights have a reference kernel for runtime='xnnpack' only")
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k).to(torch.float32)
    if per_token:
        s, zp, m = dynamic_qparams(rows, qmin, qmax, runtime, True)
    else:
        s, zp, m = (t.expand(rows.shape[0]) for t in dynamic_qparams(rows.reshape(1, -1), qmin, qmax, runtime, False))
    xc = _quantize_rows(rows, zp, s, m, qmin, qmax)
    wi = w.to(torch.int64)
    scale = w_scale.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    if group_size:
        out = torch.zeros(rows.shape[0], w.shape[0], dtype=torch.float32)
        for g in range(k // group_size):
            cols = slice(g * group_size, (g + 1) * group_size)
            acc = _exact_sum(lambda a, c: a @ c.t(), xc[:, cols], wi[:, cols], group_size)
            out = out + acc.to(torch.float32) * scale[:, g]
        out = _scale_and_bias(out, s[:, None], None, b, fused=False)
    else:
        acc = _exact_sum(lambda a, c: a @ c.t(), xc, wi, k).to(torch.float32)
        out = _scale_and_bias(acc, s[:, None], scale.reshape(1, -1), b, fused=runtime == "xnnpack",
                              folded=runtime == "onnxruntime" and not per_token)
    return out.reshape(*lead, w.shape[0])


@dynamic_linear.register_fake
def _(x, w, w_scale, bias, group_size, per_token, qmin, qmax, runtime):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qgraph_ref::dynamic_conv", mutates_args=())
def dynamic_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    qmin: int,
    qmax: int,
    runtime: str,
) -> torch.Tensor:
    """conv1d / conv2d with ``x`` quantized per call (one range for the tensor) and ``W``
    symmetric integers per output channel. Padding is a real zero: ``zp``, i.e. 0 once the
    zero point is taken off."""
    _check_runtime(runtime)
    conv_fn = F.conv1d if x.dim() == 3 else F.conv2d
    flat = x.reshape(1, -1).to(torch.float32)
    s, zp, m = dynamic_qparams(flat, qmin, qmax, runtime, False)
    xc = _quantize_rows(flat, zp, s, m, qmin, qmax).reshape(x.shape)

    def run(a, b):
        return conv_fn(a, b, None, list(stride), list(padding), list(dilation), groups)

    acc = _exact_sum(run, xc, w.to(torch.int64), w[0].numel()).to(torch.float32)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    b = None if bias is None else bias.to(torch.float32).reshape(shape)
    return _scale_and_bias(acc, s, w_scale.to(torch.float32).reshape(shape), b, fused=False,
                           folded=runtime == "onnxruntime")


@dynamic_conv.register_fake
def _(x, w, w_scale, bias, stride, padding, dilation, groups, qmin, qmax, runtime):
    conv_fn = F.conv1d if x.dim() == 3 else F.conv2d
    return conv_fn(x.to(torch.float32), w.to(torch.float32), None, list(stride), list(padding), list(dilation), groups)
