"""Errors qgraph raises.

Every error names what it is about (a node, an argument, a pass) and says what to do.
They all derive from :class:`QGraphError` so a caller can catch qgraph's own failures
apart from bugs in the model.
"""

from __future__ import annotations


class QGraphError(Exception):
    """Base class of every error qgraph raises on purpose."""


class CaptureError(QGraphError):
    """``torch.export`` could not capture the model."""


class ConfigError(QGraphError, ValueError):
    """An argument or a quantization spec makes no sense."""


class UnsupportedOperatorError(QGraphError):
    """An operator that must be quantized has no rule in the chosen backend."""


class PassOrderError(QGraphError):
    """A pipeline lists a pass before the passes it requires."""


class PassError(QGraphError):
    """A pass failed or left an invalid graph; names the passes that ran before."""


class CalibrationError(QGraphError):
    """Calibration met NaN or inf, or saw no data."""


class InputError(QGraphError, ValueError):
    """Inputs do not match what a model was captured or exported with: their number, names,
    dtypes or static sizes. The message gives the expected signature and how to change it."""


class ExportError(QGraphError):
    """A model cannot be written in the chosen format: an operator has no path to the runtime."""


class OutputPathError(QGraphError, OSError):
    """A file cannot be written at the path given: a directory, under a file, not writable."""


class ModelFileError(QGraphError):
    """A ``.pte`` / ``.onnx`` file cannot be loaded: empty, truncated, corrupt or another format."""


class ModelFileNotFoundError(ModelFileError, FileNotFoundError):
    """The ``.pte`` / ``.onnx`` file to load does not exist (also a ``FileNotFoundError``)."""
