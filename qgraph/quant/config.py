"""Which scheme each node gets: global, per operator, per module type, per module name.

Precedence follows ``torch.ao`` and torchao: module name (a regular expression matched
against the full dotted path with ``re.fullmatch``) over module type over operator over
global. A value of ``None`` keeps matching nodes in float.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.fx

from qgraph.core.errors import ConfigError
from qgraph.core.graph import module_path, module_types
from qgraph.quant.rules import QuantScheme

_UNSET = object()


@dataclass
class QConfig:
    """Where each :class:`QuantScheme` applies.

    ``scheme`` is the global scheme (None: the backend's default int8 scheme).
    ``strict=True`` turns "a conv or linear no rule quantized" from a warning into an error.
    ``keep_first_last_float=True`` keeps the first and the last conv / linear of the graph in
    float — the usual preset for low bit widths, where those two layers lose the most (see
    :func:`first_last_float`).
    """

    scheme: Optional[QuantScheme] = None
    operators: dict[object, Optional[QuantScheme]] = field(default_factory=dict)
    module_types: dict[type, Optional[QuantScheme]] = field(default_factory=dict)
    module_names: dict[str, Optional[QuantScheme]] = field(default_factory=dict)
    strict: bool = False
    keep_first_last_float: bool = False

    def set_module_name(self, pattern: str, scheme: Optional[QuantScheme]) -> "QConfig":
        re.compile(pattern)
        self.module_names[pattern] = scheme
        return self

    def set_module_type(self, cls: type, scheme: Optional[QuantScheme]) -> "QConfig":
        self.module_types[cls] = scheme
        return self

    def set_operator(self, op: object, scheme: Optional[QuantScheme]) -> "QConfig":
        self.operators[op] = scheme
        return self

    def scheme_for(self, node: torch.fx.Node, default: QuantScheme) -> Optional[QuantScheme]:
        """The scheme that applies to ``node`` (None: keep it in float)."""
        path = module_path(node)
        found = _UNSET
        for pattern, scheme in self.module_names.items():
            if path and _matches_path(pattern, path):
                found = scheme
        if found is _UNSET and self.module_types:
            names = module_types(node)
            for cls, scheme in self.module_types.items():
                qual = f"{cls.__module__}.{cls.__qualname__}"
                if qual in names:
                    found = scheme
        if found is _UNSET:
            packet = getattr(node.target, "overloadpacket", None)
            for op in (node.target, packet):
                if op in self.operators:
                    found = self.operators[op]
                    break
        if found is _UNSET:
            found = self.scheme if self.scheme is not None else default
        return found  # type: ignore[return-value]


    def check_module_names(self, gm: torch.fx.GraphModule) -> None:
        """Raise :class:`ConfigError` for a :meth:`set_module_name` pattern that matches no
        module of ``gm``, naming the closest module paths: a misspelt name would otherwise
        leave the layer it meant quantized (or float) without a word."""
        paths = {module_path(n) for n in gm.graph.nodes} - {""}
        for pattern in self.module_names:
            if any(_matches_path(pattern, path) for path in paths):
                continue
            prefixes = sorted({".".join(p.split(".")[: i + 1]) for p in paths for i in range(p.count(".") + 1)})
            close = difflib.get_close_matches(pattern, prefixes, n=3, cutoff=0.5)
            hint = f"closest: {', '.join(map(repr, close))}" if close else f"modules: {', '.join(prefixes[:10])}"
            raise ConfigError(
                f"QConfig.set_module_name({pattern!r}, ...) matches no module of the captured model ({hint}). "
                "Patterns are regular expressions matched against the dotted module path; a module that "
                "runs no op (nn.Identity) has no path in the graph."
            )


def _matches_path(pattern: str, path: str) -> bool:
    """A pattern matches a module and everything inside it: 'features.0' matches 'features.0.1'."""
    return bool(re.fullmatch(pattern, path) or re.match(f"(?:{pattern})\\.", path))


def first_last_float(scheme: Optional[QuantScheme] = None) -> QConfig:
    """Preset: ``scheme`` (or the backend's default) everywhere but the first and last layer."""
    return QConfig(scheme=scheme, keep_first_last_float=True)
