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
