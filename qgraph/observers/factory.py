"""Which module quantizes a group of points: the one place that reads ``observer`` and ``learnable``.

=========================  ==========================================  =========================
spec                       PTQ (``prepare_ptq``)                        QAT (``prepare_qat``)
=========================  ==========================================  =========================
``minmax``, moving avg.    :class:`~qgraph.observers.base.Observer`          :class:`~qgraph.observers.base.FakeQuantize`
``histogram``              :class:`~qgraph.observers.histogram.HistogramObserver`  needs ``learnable=True``
``learnable=True``         (as without it: PTQ trains nothing)          :class:`~qgraph.observers.learnable.LearnableFakeQuantize`
=========================  ==========================================  =========================

A histogram in QAT would have to choose a new range at every step; with ``learnable=True``
it chooses the starting range once and LSQ trains it from there.
"""

from __future__ import annotations

import torch
from torch import nn

from qgraph.core.errors import ConfigError
from qgraph.observers.base import FakeQuantize, Observer
from qgraph.observers.histogram import HistogramObserver
from qgraph.observers.learnable import LearnableFakeQuantize
from qgraph.quant.specs import PerGroup, QuantSpec


def make_quantizer(spec: QuantSpec, is_qat: bool, point: str, example: object = None) -> nn.Module:
    """The observer or fake-quant module for ``spec``; ``example`` is a value (or fake
    tensor) of the quantized point, needed for the number of scales of per-channel
    learnable specs."""
    if not is_qat:
        return HistogramObserver(spec, point=point) if spec.observer == "histogram" else Observer(spec, point=point)
    if spec.learnable:
        channels: int | tuple[int, ...] = 1
        grouped = isinstance(spec.granularity, PerGroup)
        if spec.is_per_channel or grouped:
            if not isinstance(example, torch.Tensor):
                raise ConfigError(
                    f"learnable per-channel / per-group spec at {point}: the point's shape is unknown "
                    "(no 'val' in node.meta)"
                )
            if grouped:  # [out, in] weight: one scale per group of the last dimension
                channels = (int(example.shape[:-1].numel()), int(example.shape[-1]) // spec.granularity.group_size)
            else:
                channels = int(example.shape[spec.granularity.axis])  # type: ignore[union-attr]
        return LearnableFakeQuantize(spec, point=point, channels=channels)
    if spec.observer == "histogram":
        raise ConfigError(
            f"QuantSpec.observer='histogram' at {point} in QAT: set learnable=True (the histogram picks the "
            "starting range, LSQ trains it) or use observer='moving_average_minmax' for QAT"
        )
    return FakeQuantize(spec, point=point)
