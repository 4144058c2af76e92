"""Plain PyTorch training and evaluation loops used by the demo, the tests and the benchmarks.

Nothing here is specific to quantization: a prepared qgraph model is an ``nn.Module`` and
trains with exactly these loops.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator:
    """Mini-batches ``(x, y)``; the last one may be smaller."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> nn.Module:
    """Adam + cross-entropy for ``epochs`` epochs; ``on_epoch(i)`` runs before epoch ``i``."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        if on_epoch is not None:
            on_epoch(epoch)
        model.train()
        for xb, yb in batches(x, y, batch_size, shuffle=True, seed=seed + epoch):
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def train_qat(
    prepared: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    freeze_bn_stats: Callable[[nn.Module], object],
    freeze_observers: Callable[[nn.Module], object],
    lr: float = 1e-3,
    progress: bool = True,
    desc: str = "QAT",
) -> nn.Module:
    """QAT with the usual schedule: BN statistics frozen for the last two epochs, observers
    (ranges) for the last one, so the final epoch trains against fixed qparams.

    The freeze functions are parameters so that the same recipe trains another flow's
    prepared model (the tests run torchao's with it).
    """

    def schedule(epoch: int) -> None:
        if epoch == epochs - 2:
            freeze_bn_stats(prepared)
        if epoch == epochs - 1:
            freeze_observers(prepared)

    return train_epochs(prepared, x, y, epochs, lr=lr, on_epoch=schedule, desc=desc, progress=progress)


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent of ``predict`` (any callable returning logits)."""
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        correct += (predict(xb).argmax(1) == yb).sum().item()
    return 100.0 * correct / len(x)
