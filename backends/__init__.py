"""Backends (``qgraph.backends``): rule tables in ``rules/``, file emitters in ``executorch/`` and
``onnx/``. Importing this package loads the rules only; an emitter loads its runtime's
packages when it is imported."""

from __future__ import annotations

from qgraph.backends.rules import (
    BACKENDS,
    X86,
    XNNPACK,
    get_backend,
    x86_dynamic_scheme,
    x86_scheme,
    xnnpack_dynamic_scheme,
    xnnpack_scheme,
)

__all__ = [
    "BACKENDS",
    "X86",
    "XNNPACK",
    "get_backend",
    "x86_dynamic_scheme",
    "x86_scheme",
    "xnnpack_dynamic_scheme",
    "xnnpack_scheme",
]
