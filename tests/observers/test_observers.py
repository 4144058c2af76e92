"""Observers and fake-quant modules: range tracking, mode rules, NaN detection."""

from __future__ import annotations

import pytest
import torch

from qgraph import CalibrationError, PerChannel, QuantSpec
from qgraph.observers.base import FakeQuantize, Observer


def test_minmax_observer_keeps_extremes_and_returns_input_unchanged():
    obs = Observer(QuantSpec(observer="minmax"))
    a, b = torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert obs(a) is a
    obs(b)
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 3.0


def test_moving_average_follows_the_update_rule():
    c = 0.25
    fq = FakeQuantize(QuantSpec(averaging_constant=c)).train()
    fq(torch.tensor([-1.0, 1.0]))
    fq(torch.tensor([-3.0, 5.0]))
    assert fq.min_val.item() == pytest.approx(-1 + c * (-3 + 1))
    assert fq.max_val.item() == pytest.approx(1 + c * (5 - 1))


def test_fake_quantize_observes_only_in_training_and_until_frozen():
    fq = FakeQuantize(QuantSpec(averaging_constant=1.0)).train()
    fq(torch.tensor([-1.0, 1.0]))
    fq.eval()
    fq(torch.tensor([-9.0, 9.0]))
    assert fq.max_val.item() == 1.0  # eval: range fixed
    fq.train()
    fq.freeze()
    fq(torch.tensor([-9.0, 9.0]))
    assert fq.max_val.item() == 1.0  # frozen: range fixed even in training


def test_per_channel_range_reduces_all_but_axis():
    fq = FakeQuantize(QuantSpec(symmetric=True, narrow_range=True, granularity=PerChannel(0))).train()
    w = torch.arange(24, dtype=torch.float32).reshape(3, 8) - 12
    fq(w)
    assert torch.equal(fq.max_val, w.amax(1)) and torch.equal(fq.min_val, w.amin(1))
    scale, _ = fq.qparams()
    assert scale.shape == (3,)


def test_observer_names_its_point_when_nan_arrives():
    obs = Observer(QuantSpec(), point="conv2d_3")
    with pytest.raises(CalibrationError, match="conv2d_3"):
        obs(torch.tensor([1.0, float("nan")]))
