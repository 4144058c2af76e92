"""A chain of conv-bn-relu blocks whose captured graph grows by a fixed number of nodes per block.

Used to measure how the cost of the qgraph pipeline grows with graph size
(``bench/scaling.py``) and to guard that it stays linear (``tests/passes/test_linear_time.py``).
Channels are few and the input small (8x8), so running the model costs next to nothing and
the time measured is the compiler's. ``torch.export`` gives 10 nodes per block (conv weight,
BN weight, bias, running mean, running var and counter, conv, ``num_batches_tracked += 1``,
batch_norm, relu) plus a fixed 6 for the stem and the input/output.
"""

from __future__ import annotations

from torch import nn


class ConvBnReluChain(nn.Module):
    """``stem conv`` then ``blocks`` × (conv 3x3 without bias → BatchNorm2d → ReLU)."""

    def __init__(self, blocks: int, channels: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
                for _ in range(blocks)
            )
        )

    def forward(self, x):
        return self.blocks(self.stem(x))
