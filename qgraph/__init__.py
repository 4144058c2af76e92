"""qgraph: a quantization compiler for PyTorch built on ``torch.export``.

    gm = qgraph.prepare_qat(model, (x,))          # or prepare_ptq + calibrate
    ... train gm like any nn.Module ...
    q = qgraph.convert(gm)
    qgraph.export_pte(q, (x,), "model.pte")
    qgraph.export_onnx(q, (x,), "model.onnx")
"""

from qgraph.api import calibrate, convert, prepare_ptq, prepare_qat
from qgraph.capture import capture
from qgraph.config import QConfig
from qgraph.emit import export_onnx, export_pte, load_onnx, load_pte
from qgraph.errors import (
    CalibrationError,
    CaptureError,
    ConfigError,
    PassError,
    PassOrderError,
    QGraphError,
    UnsupportedOperatorError,
)
from qgraph.config import first_last_float
from qgraph.coverage import coverage
from qgraph.dynamic import dynamic_config, dynamic_scheme, quantize_dynamic
from qgraph.histogram import HistogramObserver
from qgraph.learnable import LearnableFakeQuantize
from qgraph.lora import add_lora, lora_parameters, merge_lora
from qgraph.presets import histogram_ptq, learnable_qat
from qgraph.modes import eval_mode, freeze_bn_stats, freeze_observers, train_mode
from qgraph.rules import QuantScheme
from qgraph.specs import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

# Functions named like their modules: bound after the module imports so that
# ``qgraph.compare`` etc. are the functions (the modules stay in ``sys.modules``).
from qgraph.compare import LayerError, LayerErrorReport, plot_layer_histograms  # noqa: E402
from qgraph.compare import compare  # noqa: E402
from qgraph.check import CheckReport  # noqa: E402
from qgraph.check import check  # noqa: E402
from qgraph.lower import lower  # noqa: E402
from qgraph.report import write_report  # noqa: E402
from qgraph.sensitivity import MixedPrecisionResult, SensitivityReport, auto_mixed_precision  # noqa: E402
from qgraph.sensitivity import sensitivity  # noqa: E402

report = write_report

__all__ = [
    "capture",
    "prepare_qat",
    "prepare_ptq",
    "calibrate",
    "convert",
    "export_pte",
    "export_onnx",
    "load_pte",
    "load_onnx",
    "train_mode",
    "eval_mode",
    "freeze_observers",
    "freeze_bn_stats",
    "coverage",
    "quantize_dynamic",
    "add_lora",
    "merge_lora",
    "lora_parameters",
    "histogram_ptq",
    "learnable_qat",
    "HistogramObserver",
    "LearnableFakeQuantize",
    "dynamic_config",
    "dynamic_scheme",
    "compare",
    "lower",
    "check",
    "CheckReport",
    "LayerError",
    "LayerErrorReport",
    "plot_layer_histograms",
    "sensitivity",
    "SensitivityReport",
    "auto_mixed_precision",
    "MixedPrecisionResult",
    "report",
    "write_report",
    "first_last_float",
    "QConfig",
    "QuantScheme",
    "QuantSpec",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "QGraphError",
    "CaptureError",
    "ConfigError",
    "UnsupportedOperatorError",
    "PassOrderError",
    "PassError",
    "CalibrationError",
]
