"""Ready configurations for the two range choices a user reaches for first.

    config = qgraph.histogram_ptq("xnnpack", range_method="mse")
    ptq = qgraph.prepare_ptq(model, example, backend="xnnpack", config=config)

    config = qgraph.learnable_qat("xnnpack", weight_bits=4, act_bits=4)
    qat = qgraph.prepare_qat(model, example, backend="xnnpack", config=config)

Each returns a :class:`~qgraph.quant.config.QConfig` whose global scheme is the backend's own
scheme (optionally at other bit widths) with the histogram observer on activations
(:meth:`QuantScheme.with_histogram`) or learnable ranges (:meth:`QuantScheme.with_learnable_ranges`).
Pass the same ``backend`` to ``prepare_*``. To combine with per-module settings, take
``config.scheme`` and set it where you need it.
"""

from __future__ import annotations

from qgraph.backends import get_backend
from qgraph.quant.config import QConfig
from qgraph.quant.rules import QuantScheme


def _scheme(backend: str, is_qat: bool, weight_bits: int | None, act_bits: int | None) -> QuantScheme:
    scheme = get_backend(backend).default_scheme(is_qat)
    weight = scheme.weight if weight_bits is None else scheme.weight.with_(bits=weight_bits)
    act = scheme.activation
    if act is not None and act_bits is not None:
        act = act.with_(bits=act_bits)
    return QuantScheme(activation=act, weight=weight, bias=scheme.bias)


def histogram_ptq(
    backend: str = "xnnpack",
    range_method: str = "mse",
    percentile: float | None = None,
    weight_bits: int | None = None,
    act_bits: int | None = None,
    keep_first_last_float: bool = False,
) -> QConfig:
    """PTQ with histogram-calibrated activation ranges (``"mse"``, ``"entropy"`` or
    ``"percentile"``); bit widths default to the backend's."""
    scheme = _scheme(backend, False, weight_bits, act_bits).with_histogram(range_method, percentile)
    return QConfig(scheme=scheme, keep_first_last_float=keep_first_last_float)


def learnable_qat(
    backend: str = "xnnpack",
    weight_bits: int | None = None,
    act_bits: int | None = None,
    range_method: str | None = None,
    keep_first_last_float: bool = False,
) -> QConfig:
    """QAT with LSQ-learned scales (and zero points of affine activations).

    ``range_method`` (``"mse"``, ``"entropy"``, ``"percentile"``) starts the activation
    ranges from the histogram's choice on the first batch instead of its min-max.
    """
    scheme = _scheme(backend, True, weight_bits, act_bits)
    if range_method is not None:
        scheme = scheme.with_histogram(range_method)
    return QConfig(scheme=scheme.with_learnable_ranges(), keep_first_last_float=keep_first_last_float)
