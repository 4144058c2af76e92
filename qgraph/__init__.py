"""qgraph: a quantization compiler for PyTorch built on ``torch.export``.

    gm = qgraph.prepare_qat(model, (x,))          # or prepare_ptq + calibrate
    ... train gm like any nn.Module ...
    q = qgraph.convert(gm)
    qgraph.export_pte(q, (x,), "model.pte")
    qgraph.export_onnx(q, (x,), "model.onnx")

The public names below are loaded on first use (PEP 562 ``__getattr__``): ``import qgraph``
costs nothing, so ``qgraph --help`` and ``qgraph report`` start without importing torch, and
``import qgraph.core`` loads only what the core needs. Each name has one home, given here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from qgraph.core.version import __version__

_HOMES: dict[str, str] = {
    # the pipeline
    "capture": "qgraph.api.capture",
    "prepare_qat": "qgraph.api.pipeline",
    "prepare_ptq": "qgraph.api.pipeline",
    "calibrate": "qgraph.api.pipeline",
    "convert": "qgraph.api.pipeline",
    "export_pte": "qgraph.api.export",
    "export_onnx": "qgraph.api.export",
    "load_pte": "qgraph.api.export",
    "load_onnx": "qgraph.api.export",
    "lower": "qgraph.api.lower",
    "train_mode": "qgraph.api.modes",
    "eval_mode": "qgraph.api.modes",
    "freeze_observers": "qgraph.api.modes",
    "freeze_bn_stats": "qgraph.api.modes",
    "sync_batch_norm": "qgraph.api.distributed",
    "rank_local": "qgraph.core.distributed",
    # configuration
    "QConfig": "qgraph.quant.config",
    "first_last_float": "qgraph.quant.config",
    "QuantScheme": "qgraph.quant.rules",
    "QuantSpec": "qgraph.quant.specs",
    "PerTensor": "qgraph.quant.specs",
    "PerChannel": "qgraph.quant.specs",
    "PerGroup": "qgraph.quant.specs",
    "PerToken": "qgraph.quant.specs",
    "HistogramObserver": "qgraph.observers.histogram",
    "LearnableFakeQuantize": "qgraph.observers.learnable",
    # recipes
    "quantize_dynamic": "qgraph.recipes.dynamic",
    "dynamic_config": "qgraph.recipes.dynamic",
    "dynamic_scheme": "qgraph.recipes.dynamic",
    "histogram_ptq": "qgraph.recipes.presets",
    "learnable_qat": "qgraph.recipes.presets",
    "add_lora": "qgraph.recipes.lora",
    "merge_lora": "qgraph.recipes.lora",
    "lora_parameters": "qgraph.recipes.lora",
    # tools
    "coverage": "qgraph.tools.coverage",
    "compare": "qgraph.tools.compare",
    "LayerError": "qgraph.tools.compare",
    "LayerErrorReport": "qgraph.tools.compare",
    "plot_layer_histograms": "qgraph.tools.compare",
    "check": "qgraph.tools.check",
    "CheckReport": "qgraph.tools.check",
    "sensitivity": "qgraph.tools.sensitivity",
    "SensitivityReport": "qgraph.tools.sensitivity",
    "auto_mixed_precision": "qgraph.tools.sensitivity",
    "MixedPrecisionResult": "qgraph.tools.sensitivity",
    "write_report": "qgraph.tools.report",
    # errors
    "QGraphError": "qgraph.core.errors",
    "CaptureError": "qgraph.core.errors",
    "ConfigError": "qgraph.core.errors",
    "UnsupportedOperatorError": "qgraph.core.errors",
    "PassOrderError": "qgraph.core.errors",
    "PassError": "qgraph.core.errors",
    "CalibrationError": "qgraph.core.errors",
    "InputError": "qgraph.core.errors",
    "ExportError": "qgraph.core.errors",
    "OutputPathError": "qgraph.core.errors",
    "ModelFileError": "qgraph.core.errors",
    "ModelFileNotFoundError": "qgraph.core.errors",
}
_ALIASES = {"report": "write_report"}

__all__ = sorted([*_HOMES, *_ALIASES])


def __getattr__(name: str):
    real = _ALIASES.get(name, name)
    home = _HOMES.get(real)
    if home is None:
        raise AttributeError(f"module 'qgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), real)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from qgraph.api.pipeline import calibrate, convert, prepare_ptq, prepare_qat
    from qgraph.api.capture import capture
    from qgraph.api.distributed import sync_batch_norm
    from qgraph.core.distributed import rank_local
    from qgraph.core.errors import (
        CalibrationError,
        CaptureError,
        ConfigError,
        ExportError,
        InputError,
        ModelFileError,
        ModelFileNotFoundError,
        OutputPathError,
        PassError,
        PassOrderError,
        QGraphError,
        UnsupportedOperatorError,
    )
    from qgraph.api.export import export_onnx, export_pte, load_onnx, load_pte
    from qgraph.api.lower import lower
    from qgraph.api.modes import eval_mode, freeze_bn_stats, freeze_observers, train_mode
    from qgraph.observers.histogram import HistogramObserver
    from qgraph.observers.learnable import LearnableFakeQuantize
    from qgraph.quant.config import QConfig, first_last_float
    from qgraph.quant.rules import QuantScheme
    from qgraph.quant.specs import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
    from qgraph.recipes.dynamic import dynamic_config, dynamic_scheme, quantize_dynamic
    from qgraph.recipes.lora import add_lora, lora_parameters, merge_lora
    from qgraph.recipes.presets import histogram_ptq, learnable_qat
    from qgraph.tools.check import CheckReport, check
    from qgraph.tools.compare import LayerError, LayerErrorReport, compare, plot_layer_histograms
    from qgraph.tools.coverage import coverage
    from qgraph.tools.report import write_report
    from qgraph.tools.sensitivity import MixedPrecisionResult, SensitivityReport, auto_mixed_precision, sensitivity

    report = write_report
