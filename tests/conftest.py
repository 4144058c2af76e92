"""Shared fixtures: small models, and helpers that count ops by op object."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import qgraph.ops.qdq  # noqa: F401  registers quantized_decomposed ops

torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*KernelPreference.*")


def count_ops(gm: torch.fx.GraphModule) -> Counter:
    """Counter keyed by op object (``torch.ops.aten.conv2d.default``) of call_function nodes."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def run_pass(pass_, gm: torch.fx.GraphModule):
    """Apply ``pass_`` to ``gm`` and check the graph it returns is valid and runs.

    ``graph.lint()`` checks every node's arguments are defined before use and the graph
    has one output; ``recompile()`` regenerates ``forward`` from the rewritten graph.
    Returns the pass's :class:`PassResult`.
    """
    result = pass_(gm)
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return result


def x86_qat_two_steps(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` (copied) prepared for x86 QAT, trained two SGD steps on ``x``, in eval mode."""
    import copy

    import qgraph

    p = qgraph.prepare_qat(copy.deepcopy(model).train(), (x,), backend="x86")
    opt = torch.optim.SGD(p.parameters(), lr=0.01)
    for _ in range(2):
        loss = p(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p.eval()


def count_modules(gm: torch.fx.GraphModule, cls: type) -> int:
    """How many call_module nodes call a submodule of type ``cls``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls))


class ConvBnNet(nn.Module):
    """conv-bn-relu ×2 → maxpool → flatten → dropout → linear: every pattern of the first path."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine params, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture
def conv_bn_net() -> ConvBnNet:
    torch.manual_seed(0)
    return randomize_bn(ConvBnNet()).eval()


@pytest.fixture
def image_batch() -> torch.Tensor:
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
