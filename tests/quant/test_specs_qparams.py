"""Specs validate their fields; qparams match torch.ao's observers for the same range."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from qgraph import ConfigError, PerChannel, QuantSpec
from qgraph.quant.qparams import fake_quantize, qparams_from_range


def test_ranges_follow_dtype_bits_and_narrow_range():
    assert (QuantSpec().quant_min, QuantSpec().quant_max) == (-128, 127)
    assert (QuantSpec(symmetric=True, narrow_range=True).quant_min) == -127
    assert (QuantSpec(bits=4).quant_min, QuantSpec(bits=4).quant_max) == (-8, 7)
    assert (QuantSpec(dtype=torch.uint8).quant_min, QuantSpec(dtype=torch.uint8).quant_max) == (0, 255)


@pytest.mark.parametrize(
    "fields, word",
    [
        ({"bits": 9}, "bits"),
        ({"bits": 1}, "bits"),
        ({"dtype": torch.float32}, "dtype"),
        ({"observer": "histogramm"}, "observer"),
        ({"narrow_range": True}, "narrow_range"),
        ({"averaging_constant": 0.0}, "averaging_constant"),
    ],
)
def test_invalid_spec_names_the_field(fields, word):
    with pytest.raises(ConfigError, match=word):
        QuantSpec(**fields)


def test_affine_qparams_equal_torch_ao_minmax_observer():
    x = torch.randn(1000) * 3 + 1
    spec = QuantSpec(eps=torch.finfo(torch.float32).eps)
    obs = MinMaxObserver(dtype=torch.qint8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    obs(x)
    ref_scale, ref_zp = obs.calculate_qparams()
    scale, zp = qparams_from_range(x.min().reshape(1), x.max().reshape(1), spec)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp.to(torch.int32))


def test_symmetric_per_channel_qparams_equal_torch_ao():
    w = torch.randn(6, 4, 3, 3)
    spec = QuantSpec(symmetric=True, narrow_range=True, granularity=PerChannel(0), eps=torch.finfo(torch.float32).eps)
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, quant_min=-127, quant_max=127,
                                   qscheme=torch.per_channel_symmetric)  # fmt: skip
    obs(w)
    ref_scale, ref_zp = obs.calculate_qparams()
    flat = w.reshape(6, -1)
    scale, zp = qparams_from_range(flat.min(1).values, flat.max(1).values, spec)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp.to(torch.int32))


def test_range_is_widened_to_contain_zero_and_scale_clamped():
    spec = QuantSpec()
    scale, zp = qparams_from_range(torch.tensor([2.0]), torch.tensor([4.0]), spec)
    # [2, 4] widens to [0, 4]: zero maps exactly to the lowest integer.
    assert zp.item() == -128 and scale.item() == pytest.approx(4 / 255)
    scale, _ = qparams_from_range(torch.tensor([0.0]), torch.tensor([0.0]), spec)
    assert scale.item() == spec.eps


def test_fake_quantize_rounds_to_grid_and_passes_gradient_inside_range():
    spec = QuantSpec()
    scale, zp = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
    x = torch.tensor([0.04, 0.06, 100.0, -100.0], requires_grad=True)
    y = fake_quantize(x, scale, zp, spec)
    assert torch.allclose(y, torch.tensor([0.0, 0.1, 12.7, -12.8]))
    y.sum().backward()
    # Straight-through estimator: gradient 1 inside the range, 0 where values were clamped.
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
