"""Property tests of the ``qgraph_ref`` integer kernels against a float64 computation of the same math.

For every kernel the oracle computes the real value ``r`` that the output code rounds:
``r = y / s_y + zp_y`` with ``y`` the op applied to the dequantized inputs (``x = (q -
zp) · s``), in float64 from the float32 qparams a runtime stores. A kernel is right when
its code equals ``rne(r)`` clamped — exactly wherever ``r`` is farther than ``delta`` from
a rounding boundary (``k + 0.5``), and within one step where it is that close. ``delta``
bounds the kernel's own arithmetic error (float32 roundings of ``acc``, ``m`` and the
product, about ``4 · 2^-24`` relative; XNNPACK's fixed-point add: half a unit of its
multipliers per operand step), so a wrong accumulation, scale, zero point or clamp fails
— each moves ``r`` by far more — while the runtime's legitimate tie-breaking passes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import qgraph.ops.reference as R

ref = torch.ops.qgraph_ref
RUNTIMES = list(R.RUNTIMES)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
"""Derandomized (the same examples on every run, so CI is reproducible) and without
shrinking (a failure prints its drawn values; shrinking a float-heavy case takes minutes)."""
DTYPES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def _ints(shape, dtype, gen_seed):
    lo, hi = DTYPES[dtype]
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(dtype)


def _check_codes(got: torch.Tensor, r: torch.Tensor, qmin: int, qmax: int, delta: torch.Tensor | float, dtype):
    """``got`` equals clamp(rne(r)) away from rounding boundaries, and is within 1 near them."""
    assert got.dtype == dtype
    r = r.to(torch.float64)
    expected = torch.round(r).clamp(qmin, qmax)
    frac = r - torch.floor(r)
    near_tie = (frac - 0.5).abs() <= delta
    got = got.to(torch.float64)
    far = ~near_tie
    assert torch.equal(got[far], expected[far]), (
        f"{int((got[far] != expected[far]).sum())} codes differ away from ties; "
        f"worst r={r[far][(got[far] != expected[far])][:3].tolist()}"
    )
    assert (got - expected).abs().max().item() <= 1 if got.numel() else True


def _out_qparams(draw, dtype):
    lo, hi = DTYPES[dtype]
    scale = f32(draw(st.floats(1e-3, 0.5)))
    zp = draw(st.integers(lo, hi))
    return scale, zp, lo, hi


# -- exact accumulation -----------------------------------------------------------------------
def test_split_float32_accumulation_is_exact_on_long_reductions():
    # 4,608 terms of up to 255 · 128: partial sums far beyond float32's 2^24 exact range, so a
    # plain float32 conv would round; the 16·hi + lo split keeps each partial sum below 2^24.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-255, 256, (1, 512, 5, 5), generator=g)
    w = torch.randint(-128, 128, (4, 512, 3, 3), generator=g)
    exact = F.conv2d(x.double(), w.double()).to(torch.int64)
    got = R._exact_sum(lambda a, b: F.conv2d(a, b), x, w, 512 * 9)
    assert torch.equal(got, exact)
    plain = F.conv2d(x.float(), w.float()).double().to(torch.int64)
    assert exact.abs().max() > 2**24 and not torch.equal(plain, exact) or exact.abs().max() <= 2**24


# -- conv / linear / matmul ---------------------------------------------------------------
@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_conv_matches_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    conv1d = draw(st.booleans())
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "depthwise":
        groups = cin = draw(st.integers(2, 4))
        cout = groups * draw(st.integers(1, 2))
    elif kind == "grouped":
        groups = 2
        cin, cout = 2 * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3))
    else:
        groups, cin, cout = 1, draw(st.integers(1, 6)), draw(st.integers(1, 6))
    k = draw(st.integers(1, 3))
    stride, padding, dilation = draw(st.integers(1, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2))
    size = draw(st.integers(k * dilation, 7))
    spatial = (size,) if conv1d else (size, draw(st.integers(k * dilation, 7)))
    seed = draw(st.integers(0, 2**16))
    x = _ints((draw(st.integers(1, 2)), cin, *spatial), dtype, seed)
    w = _ints((cout, cin // groups, *([k] * len(spatial))), torch.int8, seed + 1).clamp(-127, 127)
    x_scale, x_zp = f32(draw(st.floats(1e-3, 0.1))), draw(st.integers(*DTYPES[dtype]))
    w_scale = torch.rand(cout, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float32) * 0.05 + 1e-3
    w_zp = torch.zeros(cout, dtype=torch.int64)
    bias = torch.randint(-5000, 5000, (cout,), generator=torch.Generator().manual_seed(seed + 3), dtype=torch.int32)
    out_scale, out_zp, lo, hi = _out_qparams(draw, dtype)
    lo = draw(st.sampled_from([lo, out_zp]))  # a fused ReLU clamps at zp
    dims = len(spatial)
    got = ref.conv(
        x, x_scale, x_zp, w, w_scale, w_zp, bias, [stride] * dims, [padding] * dims, [dilation] * dims, groups,
        out_scale, out_zp, lo, hi, dtype, runtime,
    )
    conv = F.conv1d if conv1d else F.conv2d
    xf = (x.double() - x_zp) * x_scale
    wf = w.double() * w_scale.double().reshape(-1, *([1] * (dims + 1)))
    bf = bias.double() * x_scale * w_scale.double()
    y = conv(xf, wf, bf, stride, padding, dilation, groups)
    r = y / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_linear_matches_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    n, k, m = draw(st.integers(1, 4)), draw(st.integers(1, 64)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**16))
    x = _ints((n, k), dtype, seed)
    w = _ints((m, k), torch.int8, seed + 1)
    x_scale, x_zp = f32(draw(st.floats(1e-3, 0.1))), draw(st.integers(*DTYPES[dtype]))
    per_tensor = draw(st.booleans())
    w_scale = torch.full((1,), 0.02) if per_tensor else torch.rand(m, generator=torch.Generator().manual_seed(seed)) * 0.05 + 1e-3
    w_zp = torch.tensor([draw(st.integers(-3, 3))]) if per_tensor else torch.zeros(m, dtype=torch.int64)
    bias = None if draw(st.booleans()) else torch.randint(-9000, 9000, (m,), dtype=torch.int32)
    out_scale, out_zp, lo, hi = _out_qparams(draw, dtype)
    got = ref.linear(x, x_scale, x_zp, w, w_scale, w_zp, bias, out_scale, out_zp, lo, hi, dtype, runtime)
    ws = w_scale.double().expand(m)
    wf = (w.double() - w_zp.double().reshape(-1, 1)) * ws.reshape(-1, 1)
    y = ((x.double() - x_zp) * x_scale) @ wf.T
    if bias is not None:
        y = y + bias.double() * x_scale * ws
    r = y / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_matmul_matches_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    b, n, k, m = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 32)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    a, c = _ints((b, n, k), dtype, seed), _ints((b, k, m), dtype, seed + 1)
    (sa, za), (sb, zb) = [(f32(draw(st.floats(1e-3, 0.1))), draw(st.integers(*DTYPES[dtype]))) for _ in range(2)]
    out_scale, out_zp, lo, hi = _out_qparams(draw, dtype)
    got = ref.matmul(a, sa, za, c, sb, zb, out_scale, out_zp, lo, hi, dtype, runtime)
    y = ((a.double() - za) * sa) @ ((c.double() - zb) * sb)
    r = y / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)


# -- elementwise --------------------------------------------------------------------------------
def _binary_operands(draw, dtype):
    shape = draw(st.sampled_from([(2, 3, 4), (5,), (1, 8)]))
    b_shape = draw(st.sampled_from([shape, shape[-1:], (1,) * len(shape)]))
    seed = draw(st.integers(0, 2**16))
    a, b = _ints(shape, dtype, seed), _ints(b_shape, dtype, seed + 1)
    out_scale = f32(draw(st.floats(0.01, 0.5)))
    # XNNPACK refuses input/output scale ratios outside [2^-10, 2^8)
    sa = f32(out_scale * draw(st.floats(0.01, 8.0)))
    sb = f32(out_scale * draw(st.floats(0.01, 8.0)))
    za, zb = draw(st.integers(*DTYPES[dtype])), draw(st.integers(*DTYPES[dtype]))
    out_zp = draw(st.integers(*DTYPES[dtype]))
    return a, b, sa, za, sb, zb, out_scale, out_zp


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_add_matches_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    a, b, sa, za, sb, zb, out_scale, out_zp = _binary_operands(draw, dtype)
    lo, hi = DTYPES[dtype]
    lo = draw(st.sampled_from([lo, out_zp]))
    got = ref.add(a, sa, za, b, sb, zb, out_scale, out_zp, lo, hi, dtype, runtime)
    da, db = torch.broadcast_tensors(a.double() - za, b.double() - zb)
    ra, rb = f32(sa) / f32(out_scale), f32(sb) / f32(out_scale)
    r = (da * sa + db * sb) / out_scale + out_zp
    if runtime == "xnnpack":
        _, _, shift = R.xnnpack_add_params(sa, sb, out_scale)
        delta = (da.abs() + db.abs() + 1) * 2.0**-shift + 1e-6 * (1 + r.abs())
    else:
        delta = 1e-5 * (1 + r.abs() + abs(out_zp) + da.abs() * ra + db.abs() * rb)
    _check_codes(got, r, lo, hi, delta, dtype)


def test_xnnpack_add_rounds_half_up_and_refuses_extreme_ratios():
    # a = 1 step of s_a = s_y / 2 → exactly 0.5 output steps: XNNPACK's shift rounds half up
    got = ref.add(torch.tensor([1, -1], dtype=torch.int8), 0.5, 0, torch.tensor([0, 0], dtype=torch.int8), 0.5, 0,
                  1.0, 0, -128, 127, torch.int8, "xnnpack")
    assert got.tolist() == [1, 0]  # +0.5 → 1, -0.5 → 0 (toward +inf)
    got = ref.add(torch.tensor([1, -1], dtype=torch.int8), 0.5, 0, torch.tensor([0, 0], dtype=torch.int8), 0.5, 0,
                  1.0, 0, -128, 127, torch.int8, "onnxruntime")
    assert got.tolist() == [0, 0]  # MLAS: round half to even
    with pytest.raises(ValueError, match=r"scale ratios in \[2\^-10, 2\^8\)"):
        ref.add(torch.zeros(2, dtype=torch.int8), 1e-6, 0, torch.zeros(2, dtype=torch.int8), 1.0, 0,
                1.0, 0, -128, 127, torch.int8, "xnnpack")


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_mul_matches_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    a, b, sa, za, sb, zb, _, out_zp = _binary_operands(draw, dtype)
    out_scale = f32(sa * sb * draw(st.floats(2.0, 300.0)))
    lo, hi = DTYPES[dtype]
    got = ref.mul(a, sa, za, b, sb, zb, out_scale, out_zp, lo, hi, dtype, runtime)
    da, db = torch.broadcast_tensors(a.double() - za, b.double() - zb)
    r = (da * sa) * (db * sb) / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs() + abs(out_zp)), dtype)


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_hardswish_matches_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    x = _ints((3, 50), dtype, draw(st.integers(0, 2**16)))
    x_scale, x_zp = f32(draw(st.floats(0.01, 0.1))), draw(st.integers(*DTYPES[dtype]))
    out_scale, out_zp, lo, hi = _out_qparams(draw, dtype)
    got = ref.hardswish(x, x_scale, x_zp, out_scale, out_zp, lo, hi, dtype, runtime)
    xf = (x.double() - x_zp) * x_scale
    r = xf * (xf + 3).clamp(0, 6) / 6 / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-5 * (1 + r.abs()), dtype)


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_quantize_and_requantize_match_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    scale, zp, lo, hi = _out_qparams(draw, dtype)
    x = torch.randn(200, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))) * draw(st.floats(0.01, 50))
    got = ref.quantize(x, scale, zp, lo, hi, dtype, runtime)
    r = x.double() / scale + zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)
    s2, z2, lo2, hi2 = _out_qparams(draw, dtype)
    again = ref.requantize(got, scale, zp, s2, z2, lo2, hi2, dtype, runtime)
    r2 = (got.double() - zp) * scale / s2 + z2
    _check_codes(again, r2, lo2, hi2, 1e-6 * (1 + r2.abs()), dtype)
    assert torch.equal(ref.requantize(got, scale, zp, scale, zp, lo, hi, dtype, runtime), got)


# -- data movement and pooling -----------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_cat_and_max_pool_are_exact(data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    seed = draw(st.integers(0, 2**16))
    xs = [_ints((2, c, 6, 6), dtype, seed + i) for i, c in enumerate((1, 3, 2))]
    scale, zp, lo, hi = _out_qparams(draw, dtype)
    got = ref.cat(xs, [scale] * 3, [zp] * 3, 1, scale, zp, lo, hi, dtype, "xnnpack")
    assert torch.equal(got, torch.cat(xs, 1))
    k, s, p = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    p = min(p, k // 2)
    ceil = draw(st.booleans())
    pooled = ref.max_pool(got, [k, k], [s, s], [p, p], [1, 1], ceil)
    expected = F.max_pool2d(got.double(), k, s, p, 1, ceil)
    assert pooled.dtype == dtype and torch.equal(pooled.double(), expected)


@pytest.mark.parametrize("runtime", RUNTIMES)
@SETTINGS
@given(data=st.data())
def test_mean_and_average_pools_match_float_math(runtime, data):
    draw = data.draw
    dtype = draw(st.sampled_from([torch.int8, torch.uint8]))
    x = _ints((2, 3, draw(st.integers(2, 9)), draw(st.integers(2, 9))), dtype, draw(st.integers(0, 2**16)))
    x_scale, x_zp = f32(draw(st.floats(0.01, 0.1))), draw(st.integers(*DTYPES[dtype]))
    out_scale = f32(x_scale * draw(st.floats(0.2, 2.0)))
    out_zp, (lo, hi) = draw(st.integers(*DTYPES[dtype])), DTYPES[dtype]
    xf = (x.double() - x_zp) * x_scale

    got = ref.mean(x, x_scale, x_zp, [-1, -2], True, out_scale, out_zp, lo, hi, dtype, runtime)
    r = xf.mean((-1, -2), keepdim=True) / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)

    size = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    got = ref.adaptive_avg_pool2d(x, x_scale, x_zp, size, out_scale, out_zp, lo, hi, dtype, runtime)
    r = F.adaptive_avg_pool2d(xf, size) / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)

    k = draw(st.integers(1, 2))
    pad, include = draw(st.integers(0, k // 2)), draw(st.booleans())
    got = ref.avg_pool(x, x_scale, x_zp, [k, k], [1, 1], [pad, pad], False, include, out_scale, out_zp, lo, hi, dtype, runtime)
    r = F.avg_pool2d(xf, k, 1, pad, False, include) / out_scale + out_zp
    _check_codes(got, r, lo, hi, 1e-6 * (1 + r.abs()), dtype)


# -- the float32 fused multiply-add -------------------------------------------------------------
def _fma_oracle(a: float, b: float, c: float) -> float:
    """Correctly rounded float32 of the exact ``a·b + c`` (ties to even)."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    r = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [torch.nextafter(r, torch.tensor(-math.inf)), r, torch.nextafter(r, torch.tensor(math.inf))]
    best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(torch.int32)) & 1))
    return float(best)


@SETTINGS
@given(st.floats(-300, 300, width=32), st.floats(-2, 2, width=32), st.floats(-300, 300, width=32))
def test_fma_f32_rounds_once(a, b, c):
    got = R.fma_f32(torch.tensor([a]), torch.tensor([b]), torch.tensor([c]))
    assert float(got) == _fma_oracle(a, b, c)


def test_fma_f32_on_double_rounding_cases():
    # a·b + c exactly halfway between two float32 plus a tiny remainder: rounding the float64
    # sum to float32 would round the tie to even and lose the remainder's direction.
    a = torch.tensor([1.0 + 2.0**-23], dtype=torch.float32)
    b = torch.tensor([1.0 + 2.0**-23], dtype=torch.float32)
    c = torch.tensor([2.0**-24], dtype=torch.float32)
    assert float(R.fma_f32(a, b, c)) == _fma_oracle(float(a), float(b), float(c))


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime='tflite' is not known"):
        ref.quantize(torch.zeros(2), 0.1, 0, -128, 127, torch.int8, "tflite")
