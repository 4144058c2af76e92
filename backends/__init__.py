"""Backends: one file per target. Rule tables (quantizers) and emitters (.pte, .onnx)."""

from __future__ import annotations

from qgraph.errors import ConfigError
from qgraph.rules import Backend


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a clear error lists the known ones."""
    from qgraph.backends.x86 import X86
    from qgraph.backends.xnnpack import XNNPACK

    known = {b.name: b for b in (XNNPACK, X86)}
    if not isinstance(name, str) or name not in known:
        raise ConfigError(f"backend={name!r} is not known; choose one of {sorted(known)}")
    return known[name]
