"""A small CNN for scikit-learn's 8×8 handwritten digits, and the data split qgraph uses.

The data is real (1,797 scans shipped inside scikit-learn) and needs no download. The
split is fixed: 1,400 training and 397 test images, shuffled with ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv16-bn-relu → conv32-bn-relu → maxpool → dropout → linear(10) on 1×8×8 inputs."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(32 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, n_test: int = 397) -> DigitsData:
    """The digits images scaled to [0, 1] as ``N×1×8×8`` float tensors, split train/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return DigitsData(x[train], y[train], x[test], y[test])
