"""SyncBatchNorm: batch norms in training form become qgraph::sync_batch_norm, and back.

In one process the op *is* ``aten.batch_norm`` (same kernel), so numerics are compared bit
for bit; the cross-rank math is tested with two processes in tests/api/test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qgraph
from qgraph.core.errors import ConfigError
from qgraph.ops.sync_batch_norm import SYNC_BATCH_NORM
from qgraph.passes.prepare.sync_batch_norm import SyncBatchNorm
from tests.conftest import count_ops, randomize_bn, run_pass

aten = torch.ops.aten
BN = aten.batch_norm.default


class InputBnNet(nn.Module):
    """A standalone batch norm (on the input) and a conv + BN pair (simulated in QAT)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(self.bn0(x))))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


@pytest.fixture
def prepared(image_batch):
    torch.manual_seed(0)
    return qgraph.prepare_qat(randomize_bn(InputBnNet()).train(), (image_batch,))


def test_structure_and_modified_flag(prepared):
    assert count_ops(prepared)[BN] == 2
    result = run_pass(SyncBatchNorm(), prepared)
    ops = count_ops(result.graph_module)
    assert result.modified and ops[BN] == 0 and ops[SYNC_BATCH_NORM] == 2
    assert not run_pass(SyncBatchNorm(), prepared).modified
    result = run_pass(SyncBatchNorm(enabled=False), prepared)
    ops = count_ops(result.graph_module)
    assert result.modified and ops[BN] == 2 and ops[SYNC_BATCH_NORM] == 0


def test_only_training_form_is_synchronized(prepared):
    qgraph.freeze_bn_stats(prepared)  # training=False everywhere
    assert not run_pass(SyncBatchNorm(), prepared).modified


def test_one_process_is_bit_identical_to_batch_norm(prepared, image_batch):
    """Outputs, gradients and running statistics after two steps: equal bit for bit."""
    synced = qgraph.sync_batch_norm(copy.deepcopy(prepared))
    assert count_ops(synced)[SYNC_BATCH_NORM] == 2
    for model in (prepared, synced):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            loss = model(image_batch * (step + 1)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(prepared.state_dict().items(), synced.state_dict().values()):
        assert torch.equal(a, b), name


def test_mode_switches_keep_the_choice(prepared):
    qgraph.sync_batch_norm(prepared)
    prepared.eval()  # eval form: the simulated BN is folded away, the input BN uses running stats
    assert count_ops(prepared)[BN] == 1 and count_ops(prepared)[SYNC_BATCH_NORM] == 0
    prepared.train()  # the simulated BN is rebuilt as aten.batch_norm and synchronized again
    assert count_ops(prepared)[BN] == 0 and count_ops(prepared)[SYNC_BATCH_NORM] == 2
    qgraph.freeze_bn_stats(prepared)
    assert count_ops(prepared)[BN] == 2 and count_ops(prepared)[SYNC_BATCH_NORM] == 0
    prepared.train()
    assert count_ops(prepared)[SYNC_BATCH_NORM] == 0  # frozen statistics: nothing to synchronize
    prepared.graph.lint()


def test_convert_of_a_synchronized_graph_is_unchanged(prepared, image_batch):
    synced = qgraph.sync_batch_norm(copy.deepcopy(prepared))
    for model in (prepared, synced):
        model(image_batch)  # one training step's observation
    a, b = qgraph.convert(prepared), qgraph.convert(synced)
    assert SYNC_BATCH_NORM not in count_ops(b)
    assert torch.equal(a(image_batch), b(image_batch))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_refuses_what_it_cannot_synchronize(image_batch):
    ptq = qgraph.prepare_ptq(randomize_bn(InputBnNet()).eval(), (image_batch,))
    with pytest.raises(ConfigError, match="prepare_qat"):
        qgraph.sync_batch_norm(ptq)
    with pytest.raises(ConfigError, match="prepare_qat"):
        qgraph.sync_batch_norm(InputBnNet())
