"""Dynamic post-training quantization: int8 weights ahead of time, activations per batch.

    q = qgraph.quantize_dynamic(model, (x,), backend="x86")     # like torch.ao's quantize_dynamic
    qgraph.export_onnx(q, (x,), "model.onnx")   # DynamicQuantizeLinear + MatMulInteger / ConvInteger
    qgraph.export_pte(q, (x,), "model.pte")     # XNNPACK's dynamically quantized linear / conv

``qgraph.dynamic_config(backend)`` is the preset ``quantize_dynamic`` uses, and the schemes
compose with any configuration — dynamic linears in an otherwise static model, or dynamic
everywhere but one layer::

    config = qgraph.QConfig().set_module_type(nn.Linear, qgraph.dynamic_scheme("xnnpack"))
    prepared = qgraph.prepare_ptq(model, (x,), config=config)    # calibrate, then convert
    q = qgraph.quantize_dynamic(model, (x,), config=qgraph.dynamic_config().set_module_name("head", None))

Only convs and linears (ops with a constant weight) quantize dynamically: their input gets
``scale, zp = choose_qparams(x)`` at run time, their weight is int8 per output channel, and
their output and bias stay float. Nothing needs calibration: activation ranges are chosen
per batch, and weights are observed by ``convert``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.fx
from torch import nn

from qgraph.api.pipeline import convert, prepare_ptq
from qgraph.backends import get_backend
from qgraph.core.errors import ConfigError
from qgraph.quant.config import QConfig
from qgraph.quant.rules import QuantScheme


def dynamic_scheme(backend: str = "xnnpack", per_token: bool = False) -> QuantScheme:
    """The dynamic :class:`~qgraph.QuantScheme` of ``backend``.

    * ``"xnnpack"``: int8 affine activations (ExecuTorch's
      ``get_symmetric_quantization_config(is_dynamic=True)``), int8 per-channel weights in
      ``[-127, 127]``.
    * ``"x86"``: uint8 affine activations (ONNX Runtime's ``DynamicQuantizeLinear``), 7-bit
      per-channel weights in ``[-63, 63]``.

    ``per_token=True`` picks one int8 range per row of a linear's input (per token of a
    transformer) instead of one per tensor; a conv given this scheme stays float, since its
    rows are not tokens.
    """
    rules = get_backend(backend)
    if rules.dynamic_scheme is None:
        raise ConfigError(f"backend '{backend}' has no dynamic scheme; use 'xnnpack' or 'x86'")
    return rules.dynamic_scheme(per_token=per_token)


def dynamic_config(backend: str = "xnnpack", per_token: bool | None = None) -> QConfig:
    """Preset: every conv and linear dynamic, the rest float.

    ``per_token=None`` picks what the backend's runtime computes, so that the exported file
    agrees with the converted model: XNNPACK chooses a dynamic linear's range per row of its
    input, so linears are quantized per token there and convs per tensor (XNNPACK: per image;
    export with batch 1 for an exact match); ONNX Runtime's ``DynamicQuantizeLinear`` (x86)
    chooses one range per tensor. ``True`` / ``False`` force one granularity for linears.
    """
    rules = get_backend(backend)
    per_tensor = dynamic_scheme(backend, per_token=False)
    linear_per_token = rules.dynamic_linear_per_token if per_token is None else per_token
    config = QConfig(scheme=per_tensor)
    if linear_per_token:
        config.set_operator(torch.ops.aten.linear.default, dynamic_scheme(backend, per_token=True))
    return config


def quantize_dynamic(
    model: nn.Module,
    example_inputs: Any,
    backend: str = "xnnpack",
    config: QConfig | None = None,
    dump_dir: str | os.PathLike | None = None,
) -> torch.fx.GraphModule:
    """Capture, quantize dynamically and convert ``model`` in one call; no calibration.

    ``config`` defaults to :func:`dynamic_config` ``(backend)``; a config of your own chooses
    where (``dynamic_config("x86").set_module_type(nn.Conv2d, None)`` quantizes only the
    linears). Every scheme it names must be dynamic or ``None``: a static one would need
    calibration — use :func:`qgraph.prepare_ptq`, :func:`qgraph.calibrate` and
    :func:`qgraph.convert` for a mixed static / dynamic model. Ops without a dynamic form
    (add, pooling, ...) stay float. The user's model is not changed.
    """
    if config is None:
        config = dynamic_config(backend)
    elif not isinstance(config, QConfig):
        raise ConfigError(f"config must be a qgraph.QConfig or None, got {type(config).__name__}")
    static = [where for where, scheme in _static_schemes(config)]
    if static:
        raise ConfigError(
            f"quantize_dynamic: the config gives a static scheme to {', '.join(static)}, which needs calibration; "
            "use qgraph.dynamic_scheme(...) there, or prepare_ptq + calibrate + convert for a mixed model"
        )
    prepared = prepare_ptq(model, example_inputs, backend=backend, config=config, dump_dir=dump_dir)
    return convert(prepared, dump_dir=dump_dir)


def _static_schemes(config: QConfig):
    """``(where, scheme)`` for every place a config gives a static scheme (None is float,
    except as the global scheme, where it means the backend's static default)."""
    if config.scheme is None or not config.scheme.is_dynamic:
        yield "the global scheme", config.scheme
    for table in (config.operators, config.module_types, config.module_names):
        for key, scheme in table.items():
            if scheme is not None and not scheme.is_dynamic:
                yield repr(getattr(key, "__name__", key)), scheme
