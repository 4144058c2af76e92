"""Load a model from a short text spec, for the command line.

* ``digits`` — the demo's digits CNN (random init), input ``2×1×8×8``;
* ``torchvision:NAME`` — a torchvision classification model (random init, 10 classes),
  input ``2×3×224×224``;
* ``package.module:factory`` — any importable callable returning an ``nn.Module``; give
  ``--input-shape``.

Default inputs have batch 2: with a batch of 1, torch.export would specialize the batch size.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from qgraph.core.errors import ConfigError


def load_model_spec(spec: str, input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, torch.Tensor]:
    """``(model, example_input)`` for ``spec``; the error says which forms are accepted."""
    if spec == "digits":
        from qgraph.models.digits import DigitsCNN

        return DigitsCNN().eval(), torch.randn(*(input_shape or (2, 1, 8, 8)))
    if spec.startswith("torchvision:"):
        from qgraph.models.vision import build_torchvision

        try:
            model = build_torchvision(spec.split(":", 1)[1])
        except ValueError as exc:
            raise ConfigError(f"model spec {spec!r}: {exc}") from exc
        return model.eval(), torch.randn(*(input_shape or (2, 3, 224, 224)))
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(
            f"model spec {spec!r} is not understood; use 'digits', 'torchvision:NAME' or 'package.module:factory'"
        )
    if input_shape is None:
        raise ConfigError(f"model spec {spec!r} needs --input-shape, e.g. --input-shape 1,3,224,224")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model spec {spec!r}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model.eval(), torch.randn(*input_shape)
