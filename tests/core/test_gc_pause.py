"""The collector pause: off inside, restored after (also on error), and a no-op when already off."""

from __future__ import annotations

import gc

import pytest
import torch

from qgraph.core.gc_pause import gc_paused
from qgraph.core.pass_manager import Pass, PassManager, PassResult


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_paused_inside_and_restored_after_an_error(collector_on):
    with pytest.raises(KeyError):
        with gc_paused():
            assert not gc.isenabled()
            raise KeyError("boom")
    assert gc.isenabled()


def test_left_off_when_it_was_off(collector_on):
    gc.disable()
    with gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


class _SeesCollector(Pass):
    name = "sees_collector"

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def call(self, gm):
        self.seen.append(gc.isenabled())
        return PassResult(gm, False)


def test_pass_manager_runs_passes_with_the_collector_paused(collector_on):
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    seer = _SeesCollector()
    PassManager([seer])(gm)
    assert seer.seen == [False]
    assert gc.isenabled()
