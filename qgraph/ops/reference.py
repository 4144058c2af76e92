"""Reference integer kernels: what an int8 runtime computes, op by op, written in PyTorch.

A quantized op reads integer tensors ``q`` with ``x ≈ (q - zp) * scale`` and writes an
integer tensor. Every kernel here follows the same three steps:

1. **accumulate exactly** in integers: for a conv / linear / matmul
   ``acc = Σ (x_q - x_zp) · (w_q - w_zp) + bias_q`` with an int32 bias quantized at
   ``scale = x_scale · w_scale`` (zero point 0), so it adds straight into the accumulator;
   for an add ``a_q - a_zp`` and ``b_q - b_zp`` scaled to a common unit;
2. **requantize** the accumulator to the output scale;
3. **round, add the output zero point and clamp** to ``[out_min, out_max]`` (the dtype's
   range, narrowed by a fused ReLU / ReLU6, whose bounds are quantized the way the runtime
   quantizes them).

Step 2 and 3 are where runtimes differ by one step, and ``runtime=`` picks whose
arithmetic a kernel reproduces. The rules, read from the runtimes' sources:

=====================  ======================================================  ===========================================
op                     XNNPACK (``"xnnpack"``: ExecuTorch's delegate)           ONNX Runtime CPU / MLAS (``"onnxruntime"``)
=====================  ======================================================  ===========================================
conv, linear, matmul   ``m = fl(fl(s_x·s_w[c]) / s_y)`` in float32;             the same (``QLinearConv``, ``QGemm``)
                       ``y = rne(fl(float(acc)·m)) + zp_y``, clamped
add                    fixed point: ``m_a = rne(fl(s_a/s_y)·2^shift)``,         float with fused multiply-adds:
                       ``m_b`` likewise, ``shift = 20 - exponent(max ratio)``;  ``t = fma(b, r_b, c)``,
                       ``y = (bias + a·m_a + b·m_b) >> shift`` (the bias holds  ``t = fma(a, r_a, t)``, ``y = rne(t)``,
                       ``2^(shift-1)``: round half up)                          ``r = fl(s/s_y)``, fixed part
                                                                                ``c = fl(zp_y - fma(r_a, zp_a, fl(r_b·zp_b)))``
mul                    ``y = rne(fl(float(Δa·Δb)·m)) + zp_y``,                  ``y = rne(fl(fl(float(Δa·Δb)·m) + zp_y))``
                       ``m = fl(fl(s_a·s_b)/s_y)``
quantize (float in)    ``rne(x · fl(1/s)) + zp``                                ``rne(x / s) + zp``
=====================  ======================================================  ===========================================

``rne`` is round-half-to-even (the default rounding of SSE/AVX conversions), ``fl`` a
float32 rounding. Ops a runtime computes in float — or through a 256-entry table built in
float, as XNNPACK does for hardswish — are emulated in float32 here: dequantize, the ATen
op, then the runtime's quantize. Pooling that only selects (max-pool) and ``cat`` of
inputs sharing the output qparams are exact in every runtime.

Exact accumulation: products ``(x - zp)·w`` are integers below ``2^16``; a float32 sum of
such integers is exact while every partial sum stays below ``2^24``. The input is split
as ``x = 16·x_hi + x_lo`` (``x_lo ∈ [0, 16)``) so that two float32 convolutions stay
under that bound for up to ``2^24 / (16·max|w|)`` terms per output (8,000 for int8
weights); longer reductions use float64, exact to ``2^53``.

Extension points: a new runtime is one more name in :data:`RUNTIMES` and one branch in the
requantization helpers below. Dynamically quantized layers (float in, float out, qparams
chosen per call; per-group int4 weights) are in :mod:`qgraph.ops.reference_dynamic`.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

RUNTIMES = ("xnnpack", "onnxruntime")
"""Runtimes whose integer arithmetic the kernels reproduce."""

_EXACT_F32 = float(2**24)


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not known; choose one of {RUNTIMES}")


def f32(value: float) -> torch.Tensor:
    """A Python float rounded to float32 (runtimes store qparams as float32)."""
    return torch.tensor(value, dtype=torch.float32)


def _f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _bits_f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _rne_f32_scalar(value: float) -> int:
    """``lrintf``: round half to even of a float32 value."""
    return int(torch.round(f32(value)).item())


# -- exact integer accumulation ----------------------------------------------------------
def _exact_sum(fn, x: torch.Tensor, w: torch.Tensor, terms: int) -> torch.Tensor:
    """``fn(x, w)`` (a conv or matmul, linear in ``x``) exactly, as int64.

    ``x`` and ``w`` hold integers (zero points already removed).
    """
    w_max = int(w.abs().max().item()) if w.numel() else 0
    if terms * 16 * max(w_max, 1) < _EXACT_F32:
        hi = torch.div(x, 16, rounding_mode="floor")
        lo = x - 16 * hi
        wf = w.to(torch.float32)
        acc_hi = fn(hi.to(torch.float32), wf).round().to(torch.int64)
        acc_lo = fn(lo.to(torch.float32), wf).round().to(torch.int64)
        return 16 * acc_hi + acc_lo
    return fn(x.to(torch.float64), w.to(torch.float64)).round().to(torch.int64)


def _centered(q: torch.Tensor, zero_point) -> torch.Tensor:
    return q.to(torch.int64) - (zero_point.to(torch.int64) if isinstance(zero_point, torch.Tensor) else int(zero_point))


def _weight_offsets(w: torch.Tensor, w_zero_point: torch.Tensor) -> torch.Tensor:
    """``w_q - w_zp`` with one zero point per output channel (dim 0) or one for all."""
    zp = w_zero_point.to(torch.int64).reshape(-1)
    if zp.numel() == 1:
        return w.to(torch.int64) - zp[0]
    return w.to(torch.int64) - zp.reshape(-1, *([1] * (w.dim() - 1)))


# -- requantization ------------------------------------------------------------------------
def _requant_multiplier(in_scale: float, w_scale: torch.Tensor, out_scale: float) -> torch.Tensor:
    """``fl(fl(s_x · s_w) / s_y)`` in float32, per output channel (XNNPACK and MLAS agree)."""
    return (f32(in_scale) * w_scale.to(torch.float32).reshape(-1)) / f32(out_scale)


def requantize_fp32(
    acc: torch.Tensor, multiplier: torch.Tensor, out_zp: int, out_min: int, out_max: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """``clamp(rne(fl(float32(acc) · m)) + zp)``: the fp32 requantization of XNNPACK and MLAS.

    ``acc`` is int64 holding int32 values; its conversion to float32 rounds to nearest
    even, as ``cvtdq2ps`` does. Clamping before or after rounding gives the same result
    because the bounds are integers.
    """
    scaled = acc.to(torch.float32) * multiplier
    return (torch.round(scaled) + out_zp).clamp(out_min, out_max).to(out_dtype)


def quantize_float(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype, runtime: str
) -> torch.Tensor:
    """Float → integer as the runtime's quantize kernel does it (see the module table)."""
    _check_runtime(runtime)
    x = x.to(torch.float32)
    if runtime == "xnnpack":
        scaled = x * (1.0 / f32(scale))  # f32 reciprocal, then a multiply
    else:
        scaled = x / f32(scale)
    return (torch.round(scaled) + zero_point).clamp(qmin, qmax).to(dtype)


def dequantize_int(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``(q - zp) · s`` in float32, as every runtime dequantizes."""
    return (q.to(torch.float32) - zero_point) * f32(scale)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Fused multiply-add of float32 tensors, rounded once, as ``vfmadd`` does.

    ``a·b`` is exact in float64 (24 + 24 bits). The float64 sum ``s`` with ``c`` carries an
    error ``e`` (two-sum, exact); rounding ``s`` to float32 is the true single rounding
    unless ``s`` lies exactly halfway between two float32 values and ``e`` ≠ 0, where the
    sign of ``e`` decides.
    """
    p = a.to(torch.float64) * b.to(torch.float64)
    c64 = c.to(torch.float64)
    s = p + c64
    bp = s - c64
    e = (p - bp) + (c64 - (s - bp))
    r = s.to(torch.float32)
    r64 = r.to(torch.float64)
    tie = (s - r64).abs() * 2 == _ulp32(r).to(torch.float64)
    if bool((tie & (e != 0)).any()):
        toward = torch.where(e > 0, torch.full_like(r, float("inf")), torch.full_like(r, float("-inf")))
        moved = torch.nextafter(r, toward)
        # keep r when it is already on the side the true value is on
        on_side = ((e > 0) & (r64 > s)) | ((e < 0) & (r64 < s))
        r = torch.where(tie & (e != 0) & ~on_side, moved, r)
    return r


def _ulp32(r: torch.Tensor) -> torch.Tensor:
    up = torch.nextafter(r, torch.full_like(r, float("inf")))
    down = torch.nextafter(r, torch.full_like(r, float("-inf")))
    return torch.minimum(up - r, r - down).abs()


def _clamp_store(q: torch.Tensor, out_min: int, out_max: int, out_dtype: torch.dtype) -> torch.Tensor:
    return q.clamp(out_min, out_max).to(out_dtype)


# -- the ops -----------------------------------------------------------------------------------
@torch.library.custom_op("qgraph_ref::quantize", mutates_args=())
def quantize(
    x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype, runtime: str
) -> torch.Tensor:
    """Float → integer with the runtime's rounding (``x · fl(1/s)`` or ``x / s``, then rne)."""
    return quantize_float(x, scale, zero_point, qmin, qmax, dtype, runtime)


@quantize.register_fake
def _(x, scale, zero_point, qmin, qmax, dtype, runtime):
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("qgraph_ref::conv", mutates_args=())
def conv(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zp: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Integer conv1d / conv2d (grouped and depthwise too): exact int32 accumulation with
    the int32 ``bias``, then the fp32 requantization. Padding contributes ``x_zp`` (a real
    zero), which after removing the zero point is 0."""
    _check_runtime(runtime)
    conv_fn = F.conv1d if x.dim() == 3 else F.conv2d
    xc = _centered(x, x_zp)
    wc = _weight_offsets(w, w_zp)
    terms = wc[0].numel()

    def run(a, b):
        return conv_fn(a, b, None, list(stride), list(padding), list(dilation), groups)

    acc = _exact_sum(run, xc, wc, terms)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(shape)
    m = _requant_multiplier(x_scale, w_scale, out_scale)
    m = m.reshape(shape) if m.numel() > 1 else m.reshape(())
    return requantize_fp32(acc, m, out_zp, out_min, out_max, out_dtype)


@conv.register_fake
def _(x, x_scale, x_zp, w, w_scale, w_zp, bias, stride, padding, dilation, groups, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    conv_fn = F.conv1d if x.dim() == 3 else F.conv2d
    out = conv_fn(x.to(torch.float32), w.to(torch.float32), None, list(stride), list(padding), list(dilation), groups)
    return torch.empty_like(out, dtype=out_dtype)


@torch.library.custom_op("qgraph_ref::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zp: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Integer ``x @ w.T + bias`` with per-output-channel weight scales (XNNPACK's
    fully-connected, MLAS's ``QGemm``), requantized in fp32."""
    _check_runtime(runtime)
    xc = _centered(x, x_zp)
    wc = _weight_offsets(w, w_zp)
    acc = _exact_sum(lambda a, b: a @ b.transpose(0, 1), xc, wc, w.shape[1])
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    m = _requant_multiplier(x_scale, w_scale, out_scale)
    return requantize_fp32(acc, m if m.numel() > 1 else m.reshape(()), out_zp, out_min, out_max, out_dtype)


@linear.register_fake
def _(x, x_scale, x_zp, w, w_scale, w_zp, bias, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qgraph_ref::matmul", mutates_args=())
def matmul(
    a: torch.Tensor,
    a_scale: float,
    a_zp: int,
    b: torch.Tensor,
    b_scale: float,
    b_zp: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Integer ``a @ b`` of two activations (batched as ``torch.matmul``), fp32 requantization
    with ``m = fl(fl(s_a·s_b)/s_y)``."""
    _check_runtime(runtime)
    ac, bc = _centered(a, a_zp), _centered(b, b_zp)
    acc = _exact_sum(torch.matmul, ac, bc, a.shape[-1])
    m = _requant_multiplier(a_scale, f32(b_scale), out_scale).reshape(())
    return requantize_fp32(acc, m, out_zp, out_min, out_max, out_dtype)


@matmul.register_fake
def _(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(out_dtype)


def xnnpack_add_params(a_scale: float, b_scale: float, out_scale: float) -> tuple[int, int, int]:
    """``(m_a, m_b, shift)`` of XNNPACK's quantized add (``xnn_init_qs8_add_minmax_scalar_params``).

    The larger ratio ``s/s_y`` gets a multiplier in ``[2^20, 2^21)``: ``shift = 20 -
    exponent``; each multiplier is ``rne(ratio · 2^shift)`` (an exponent increment, then
    ``lrintf``). XNNPACK refuses ratios outside ``[2^-10, 2^8)``.
    """
    ra = float(f32(a_scale) / f32(out_scale))
    rb = float(f32(b_scale) / f32(out_scale))
    for name, r in (("a", ra), ("b", rb)):
        if not 2.0**-10 <= abs(r) < 2.0**8:
            raise ValueError(
                f"XNNPACK's quantized add needs input/output scale ratios in [2^-10, 2^8); "
                f"operand {name} has {r:.6g}"
            )
    biggest = max(abs(ra), abs(rb))
    exponent = (_f32_bits(biggest) >> 23) - 127
    shift = 20 - exponent
    ma = _rne_f32_scalar(_bits_f32(_f32_bits(abs(ra)) + (shift << 23)))
    mb = _rne_f32_scalar(_bits_f32(_f32_bits(abs(rb)) + (shift << 23)))
    return (-ma if ra < 0 else ma), (-mb if rb < 0 else mb), shift


@torch.library.custom_op("qgraph_ref::add", mutates_args=())
def add(
    a: torch.Tensor,
    a_scale: float,
    a_zp: int,
    b: torch.Tensor,
    b_scale: float,
    b_zp: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Quantized ``a + b`` (broadcasting) with the runtime's arithmetic (module table)."""
    _check_runtime(runtime)
    a, b = torch.broadcast_tensors(a, b)
    if runtime == "xnnpack":
        ma, mb, shift = xnnpack_add_params(a_scale, b_scale, out_scale)
        bias = (1 << (shift - 1)) - ma * a_zp - mb * b_zp
        acc = bias + a.to(torch.int64) * ma + b.to(torch.int64) * mb
        q = torch.bitwise_right_shift(acc, shift) + out_zp  # arithmetic shift: floor
        return _clamp_store(q, out_min, out_max, out_dtype)
    ra = f32(a_scale) / f32(out_scale)
    rb = f32(b_scale) / f32(out_scale)
    # MLAS writes zp_c - (r_a·zp_a + r_b·zp_b); the compiler contracts it into one fused
    # multiply-add (measured: the unfused form misses 2 of 100,352 outputs of a mobilenet_v2 add).
    fixed = f32(float(out_zp)) - fma_f32(ra, f32(float(a_zp)), rb * float(b_zp))
    t = fma_f32(b.to(torch.float32), rb.expand(b.shape), fixed.expand(b.shape))
    t = fma_f32(a.to(torch.float32), ra.expand(a.shape), t)
    return _clamp_store(torch.round(t), out_min, out_max, out_dtype)


@add.register_fake
def _(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=out_dtype, device=a.device)


@torch.library.custom_op("qgraph_ref::mul", mutates_args=())
def mul(
    a: torch.Tensor,
    a_scale: float,
    a_zp: int,
    b: torch.Tensor,
    b_scale: float,
    b_zp: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Quantized ``a * b``: the exact product ``(a - zp_a)(b - zp_b)`` scaled by
    ``m = fl(fl(s_a·s_b)/s_y)``; MLAS adds the zero point before rounding, XNNPACK after."""
    _check_runtime(runtime)
    acc = _centered(a, a_zp) * _centered(b, b_zp)
    m = (f32(a_scale) * f32(b_scale)) / f32(out_scale)
    scaled = acc.to(torch.float32) * m
    if runtime == "xnnpack":
        q = torch.round(scaled) + out_zp
    else:
        q = torch.round(scaled + f32(float(out_zp)))
    return _clamp_store(q, out_min, out_max, out_dtype)


@mul.register_fake
def _(a, a_scale, a_zp, b, b_scale, b_zp, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=out_dtype, device=a.device)


@torch.library.custom_op("qgraph_ref::requantize", mutates_args=())
def requantize(
    x: torch.Tensor,
    in_scale: float,
    in_zp: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Change qparams: ``rne(fl(float(x - zp_x) · fl(s_x/s_y))) + zp_y``. The identity when the
    qparams are equal (then only the clamp of a fused activation acts)."""
    _check_runtime(runtime)
    if f32(in_scale) == f32(out_scale) and in_zp == out_zp:
        return _clamp_store(x.to(torch.int64), out_min, out_max, out_dtype)
    m = f32(in_scale) / f32(out_scale)
    return requantize_fp32(_centered(x, in_zp), m, out_zp, out_min, out_max, out_dtype)


@requantize.register_fake
def _(x, in_scale, in_zp, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.empty_like(x, dtype=out_dtype)


@torch.library.custom_op("qgraph_ref::cat", mutates_args=())
def cat(
    xs: Sequence[torch.Tensor],
    scales: Sequence[float],
    zero_points: Sequence[int],
    dim: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Concatenate integer tensors; an input whose qparams differ from the output's is
    requantized first (qgraph's backends share one set, so this is a plain copy)."""
    parts = [
        requantize(x, float(s), int(z), out_scale, out_zp, out_min, out_max, out_dtype, runtime)
        for x, s, z in zip(xs, scales, zero_points)
    ]
    return torch.cat(parts, dim)


@cat.register_fake
def _(xs, scales, zero_points, dim, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.cat([torch.empty_like(x, dtype=out_dtype) for x in xs], dim)


@torch.library.custom_op("qgraph_ref::max_pool", mutates_args=())
def max_pool(
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
) -> torch.Tensor:
    """Max-pooling of integers: exact, since quantization is monotonic and input and output
    share qparams. (Padding never wins: PyTorch pads max-pool with -inf.)"""
    pool = F.max_pool1d if x.dim() == 3 else F.max_pool2d
    out = pool(x.to(torch.float32), list(kernel_size), list(stride) or None, list(padding), list(dilation), ceil_mode)
    return out.to(x.dtype)


@max_pool.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    pool = F.max_pool1d if x.dim() == 3 else F.max_pool2d
    out = pool(x.to(torch.float32), list(kernel_size), list(stride) or None, list(padding), list(dilation), ceil_mode)
    return torch.empty_like(out, dtype=x.dtype)


def _mean_requantize(
    total: torch.Tensor, count: int, in_scale: float, in_zp: int, out_scale: float, out_zp: int,
    out_min: int, out_max: int, out_dtype: torch.dtype, runtime: str,
) -> torch.Tensor:
    """An exact integer window sum ``Σ q`` of ``count`` inputs → the quantized mean."""
    centered = total - count * in_zp
    if runtime == "xnnpack":
        m = f32(in_scale) / (f32(out_scale) * f32(float(count)))
        return requantize_fp32(centered, m, out_zp, out_min, out_max, out_dtype)
    mean = dequantize_int(centered, in_scale, 0) / f32(float(count))
    return quantize_float(mean, out_scale, out_zp, out_min, out_max, out_dtype, runtime)


@torch.library.custom_op("qgraph_ref::mean", mutates_args=())
def mean(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    dims: Sequence[int],
    keepdim: bool,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Quantized mean over ``dims`` (global average pooling): the exact integer sum, then
    one requantization by ``s_x / (s_y · n)``."""
    _check_runtime(runtime)
    dims = [d % x.dim() for d in dims]
    count = 1
    for d in dims:
        count *= x.shape[d]
    total = x.to(torch.int64).sum(dim=dims, keepdim=keepdim)
    return _mean_requantize(total, count, x_scale, x_zp, out_scale, out_zp, out_min, out_max, out_dtype, runtime)


@mean.register_fake
def _(x, x_scale, x_zp, dims, keepdim, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.empty_like(x.to(torch.float32).mean(dim=list(dims), keepdim=keepdim), dtype=out_dtype)


@torch.library.custom_op("qgraph_ref::avg_pool", mutates_args=())
def avg_pool(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Quantized average pooling (1d / 2d): window sums of ``x - zp`` (padding adds zeros),
    divided by each window's count, requantized like :func:`mean`."""
    _check_runtime(runtime)
    squeeze = x.dim() == 3
    xc = _centered(x, x_zp).to(torch.float64)
    ks, st, pd = list(kernel_size), list(stride) or list(kernel_size), list(padding)
    if squeeze:  # 1d as 2d with a unit height: avg_pool1d has no divisor_override
        xc, ks, st, pd = xc.unsqueeze(-2), [1, *ks], [1, *st], [0, *pd]
    ones = torch.ones_like(xc[:1, :1])
    sums = F.avg_pool2d(xc, ks, st, pd, ceil_mode, True, 1).round()  # exact float64 window sums
    real = F.avg_pool2d(ones, ks, st, pd, ceil_mode, True, 1)
    counts = (real / F.avg_pool2d(ones, ks, st, pd, ceil_mode, True)).round() if count_include_pad else real
    out = _pool_requantize(sums, counts, x_scale, out_scale, out_zp, out_min, out_max, out_dtype, runtime)
    return out.squeeze(-2) if squeeze else out


def _pool_requantize(sums, counts, x_scale, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    """Requantize exact window sums of centered inputs, each divided by its window's divisor
    (``counts``, broadcastable to ``sums``): one :func:`_mean_requantize` per distinct divisor."""
    divisors = counts.round().to(torch.int64).expand_as(sums)
    out = torch.empty(sums.shape, dtype=out_dtype)
    for d in divisors.unique().tolist():
        where = divisors == d
        out[where] = _mean_requantize(
            sums[where].to(torch.int64), int(d), x_scale, 0, out_scale, out_zp, out_min, out_max, out_dtype, runtime
        )
    return out


@avg_pool.register_fake
def _(x, x_scale, x_zp, kernel_size, stride, padding, ceil_mode, count_include_pad, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    pool = F.avg_pool1d if x.dim() == 3 else F.avg_pool2d
    out = pool(x.to(torch.float32), list(kernel_size), list(stride) or None, list(padding), ceil_mode, count_include_pad)
    return torch.empty_like(out, dtype=out_dtype)


def _adaptive_window_sizes(length: int, out: int) -> torch.Tensor:
    """Window lengths of adaptive pooling: ``[floor(i·L/out), ceil((i+1)·L/out))`` (PyTorch's rule)."""
    i = torch.arange(out, dtype=torch.int64)
    start = torch.div(i * length, out, rounding_mode="floor")
    end = torch.div((i + 1) * length + out - 1, out, rounding_mode="floor")
    return (end - start).to(torch.float64)


@torch.library.custom_op("qgraph_ref::adaptive_avg_pool2d", mutates_args=())
def adaptive_avg_pool2d(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    output_size: Sequence[int],
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Quantized adaptive average pooling: a global mean for output size 1×1, else exact
    window sums divided by each window's size (PyTorch's window boundaries)."""
    _check_runtime(runtime)
    size = list(output_size)
    if size == [1, 1]:
        return mean(x, x_scale, x_zp, [-2, -1], True, out_scale, out_zp, out_min, out_max, out_dtype, runtime)
    xc = _centered(x, x_zp).to(torch.float64)
    counts = _adaptive_window_sizes(x.shape[-2], size[0])[:, None] * _adaptive_window_sizes(x.shape[-1], size[1])[None, :]
    sums = (F.adaptive_avg_pool2d(xc, size) * counts).round()  # exact: float64 means of small integers
    return _pool_requantize(sums, counts, x_scale, out_scale, out_zp, out_min, out_max, out_dtype, runtime)


@adaptive_avg_pool2d.register_fake
def _(x, x_scale, x_zp, output_size, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.empty((*x.shape[:-2], *output_size), dtype=out_dtype, device=x.device)


@torch.library.custom_op("qgraph_ref::hardswish", mutates_args=())
def hardswish(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    out_scale: float,
    out_zp: int,
    out_min: int,
    out_max: int,
    out_dtype: torch.dtype,
    runtime: str,
) -> torch.Tensor:
    """Quantized hardswish through a table of every input code: dequantize, hardswish in
    float32, quantize with the runtime's rounding. XNNPACK builds exactly such a table for
    8-bit unary ops; ONNX Runtime runs DQ → HardSwish → Q in float."""
    _check_runtime(runtime)
    info = torch.iinfo(x.dtype)
    codes = torch.arange(info.min, info.max + 1, dtype=torch.int64)
    y = F.hardswish(dequantize_int(codes, x_scale, x_zp))
    table = quantize_float(y, out_scale, out_zp, out_min, out_max, out_dtype, runtime)
    return table[x.to(torch.int64) - info.min]


@hardswish.register_fake
def _(x, x_scale, x_zp, out_scale, out_zp, out_min, out_max, out_dtype, runtime):
    return torch.empty_like(x, dtype=out_dtype)


REFERENCE_OPS = frozenset(
    op.default
    for op in (
        torch.ops.qgraph_ref.quantize,
        torch.ops.qgraph_ref.conv,
        torch.ops.qgraph_ref.linear,
        torch.ops.qgraph_ref.matmul,
        torch.ops.qgraph_ref.add,
        torch.ops.qgraph_ref.mul,
        torch.ops.qgraph_ref.requantize,
        torch.ops.qgraph_ref.cat,
        torch.ops.qgraph_ref.max_pool,
        torch.ops.qgraph_ref.mean,
        torch.ops.qgraph_ref.avg_pool,
        torch.ops.qgraph_ref.adaptive_avg_pool2d,
        torch.ops.qgraph_ref.hardswish,
    )
)
"""Every ``qgraph_ref`` op object, for matching lowered graphs."""
