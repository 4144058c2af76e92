"""Backend rule tables: one base table, and what x86 and XNNPACK state differently."""

from __future__ import annotations

from qgraph.backends.rules.base import BASE_RULES
from qgraph.backends.rules.x86 import X86, x86_dynamic_scheme, x86_scheme
from qgraph.backends.rules.xnnpack import XNNPACK, xnnpack_dynamic_scheme, xnnpack_scheme
from qgraph.core.errors import ConfigError
from qgraph.quant.rules import Backend

BACKENDS: dict[str, Backend] = {b.name: b for b in (XNNPACK, X86)}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a clear error lists the known ones."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is not known; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = [
    "BACKENDS",
    "BASE_RULES",
    "X86",
    "XNNPACK",
    "get_backend",
    "x86_dynamic_scheme",
    "x86_scheme",
    "xnnpack_dynamic_scheme",
    "xnnpack_scheme",
]
