"""torchvision classification models built from their definitions (random init, no download)."""

from __future__ import annotations

import torch
from torch import nn


def build_torchvision(name: str, num_classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    """``torchvision.models.<name>(num_classes=..., **kwargs)`` with seeded random weights.

    ``kwargs`` go to the model's builder, e.g. ``image_size=64`` for a vision transformer.
    """
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision classification model {name!r}")
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def settle_batch_norm(model: nn.Module, batches) -> nn.Module:
    """Set every batch norm's running statistics to the cumulative average over ``batches``.

    A randomly initialised network's statistics (mean 0, variance 1) do not match what its
    layers compute, so activations vanish or blow up layer after layer; measured on data,
    every layer sees normalized activations and realistic quantization ranges. Each BN's
    ``momentum`` is restored afterwards. Returns ``model`` in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval()
