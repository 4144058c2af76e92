"""The public API: no mutation of the user's model, dynamic batch, modes, schedules, errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import qgraph
from qgraph import CaptureError, ConfigError
from qgraph.core.graph import is_op
from qgraph.core.opsets import BATCH_NORM_OPS
from qgraph.observers.base import FakeQuantize
from qgraph.ops.stochastic_depth import EVAL_IDENTITY_OPS


def _train_steps(model, batches, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x in batches:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_user_model_is_never_mutated(conv_bn_net, image_batch):
    before = copy.deepcopy(conv_bn_net.state_dict())
    p = qgraph.prepare_qat(conv_bn_net.train(), (image_batch,))
    _train_steps(p, [image_batch])
    qgraph.convert(p.eval())
    ptq = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(ptq, [image_batch], progress=False)
    qgraph.convert(ptq)
    after = conv_bn_net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert conv_bn_net.training  # still in the mode the user left it in
    assert not any(isinstance(m, FakeQuantize) for m in conv_bn_net.modules())


def test_convert_shares_no_state_with_the_prepared_model(conv_bn_net, image_batch):
    # convert switches its copy's simulated BN to the eval form (no live BN); the prepared
    # model, converted while training, must keep switching between its own forms.
    def live_bns(gm):
        return sum(is_op(n, BATCH_NORM_OPS) for n in gm.graph.nodes)

    p = qgraph.prepare_qat(conv_bn_net.train(), (image_batch,))
    _train_steps(p, [image_batch])
    assert live_bns(p) == 2  # one per conv in train form
    qgraph.convert(p)
    assert p.training and live_bns(p) == 2
    assert live_bns(p.eval()) == 0
    assert live_bns(p.train()) == 2
    _train_steps(p, [image_batch])


def test_prepared_model_trains_on_a_smaller_last_batch_and_serves_batch_1(conv_bn_net, image_batch):
    p = qgraph.prepare_qat(conv_bn_net.train(), (image_batch,))
    _train_steps(p, [image_batch, image_batch[:5]])  # last batch smaller than the example
    p.eval()
    assert p(image_batch[:1]).shape == (1, 5)
    q = qgraph.convert(p)
    assert q(image_batch[:1]).shape == (1, 5) and q(image_batch[:3]).shape == (3, 5)


def _flags(gm):
    drop = [n.args for n in gm.graph.nodes if is_op(n, EVAL_IDENTITY_OPS)]
    bns = [n.args[5:8] for n in gm.graph.nodes if is_op(n, BATCH_NORM_OPS)]
    return drop, bns


def test_train_and_eval_switch_flags_and_keep_p_eps_momentum(image_batch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3), nn.Dropout(0.25), nn.ReLU())
    gm = qgraph.capture(model.train(), (image_batch,))
    qgraph.eval_mode(gm)
    (drop,), (bn,) = _flags(gm)
    assert drop[1:] == (0.25, False) and bn == (False, 0.3, 1e-3)
    qgraph.train_mode(gm)
    (drop,), (bn,) = _flags(gm)
    assert drop[1:] == (0.25, True) and bn == (True, 0.3, 1e-3)
    # On a prepared model .train() / .eval() do the same (exported modules refuse them).
    p = qgraph.prepare_qat(model, (image_batch,))
    p.eval()
    assert not p.training and all(not m.training for m in p.modules())
    p.train()
    assert p.training and all(m.training for m in p.modules())


def test_freeze_observers_and_bn_stats(conv_bn_net, image_batch):
    p = qgraph.prepare_qat(conv_bn_net.train(), (image_batch,))
    _train_steps(p, [image_batch])
    qgraph.freeze_observers(p)
    qgraph.freeze_bn_stats(p)
    ranges = {n: (m.min_val.clone(), m.max_val.clone()) for n, m in p.named_modules() if isinstance(m, FakeQuantize)}
    mean = p.get_buffer("bn1.running_mean").clone()
    p.train()
    _train_steps(p, [image_batch * 3])
    for name, m in p.named_modules():
        if isinstance(m, FakeQuantize) and not m.spec.is_per_channel:
            assert torch.equal(m.min_val, ranges[name][0]) and torch.equal(m.max_val, ranges[name][1])
    assert torch.equal(p.get_buffer("bn1.running_mean"), mean)


def test_wrong_backend_names_the_argument(conv_bn_net, image_batch):
    with pytest.raises(ConfigError, match=r"backend='xnnpak' is not known; choose one of \['x86', 'xnnpack'\]"):
        qgraph.prepare_qat(conv_bn_net, (image_batch,), backend="xnnpak")


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: torch.export cannot trace it
            return x * 2
        return x


def test_model_that_cannot_be_exported_gives_capture_error(image_batch):
    with pytest.raises(CaptureError, match=r"could not capture _DataDependent.*data-dependent"):
        qgraph.prepare_ptq(_DataDependent(), (image_batch,))


def test_operator_without_rule_in_config_is_rejected(conv_bn_net, image_batch):
    scheme = qgraph.backends.rules.xnnpack.xnnpack_scheme()
    config = qgraph.QConfig().set_operator(torch.ops.aten.softmax.int, scheme)
    with pytest.raises(ConfigError, match=r"aten.softmax.int.*no rule"):
        qgraph.prepare_ptq(conv_bn_net, (image_batch,), config=config)


def test_convert_and_export_check_what_they_are_given(conv_bn_net, image_batch, tmp_path):
    with pytest.raises(ConfigError, match="prepare_qat or qgraph.prepare_ptq"):
        qgraph.convert(qgraph.capture(conv_bn_net, (image_batch,)))
    p = qgraph.prepare_qat(conv_bn_net, (image_batch,))
    with pytest.raises(ConfigError, match=r"call qgraph.convert\(prepared\)"):
        qgraph.export_onnx(p, (image_batch,), tmp_path / "m.onnx")


def test_failed_export_leaves_existing_file_untouched(conv_bn_net, image_batch, tmp_path, monkeypatch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    qgraph.calibrate(p, [image_batch], progress=False)
    q = qgraph.convert(p)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    import onnx.checker

    def broken(*_a, **_k):
        raise RuntimeError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="checker says no"):
        qgraph.export_onnx(q, (image_batch,), target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left behind


def test_written_files_get_the_usual_permissions(tmp_path):
    # an atomic write goes through a private temporary file; the result must not stay 0600
    from qgraph.core.files import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_calibrate_names_where_nan_first_appears(conv_bn_net, image_batch):
    p = qgraph.prepare_ptq(conv_bn_net, (image_batch,))
    bad = image_batch.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(qgraph.CalibrationError, match="NaN or inf reached the observer of x__conv2d"):
        qgraph.calibrate(p, [bad], progress=False)
