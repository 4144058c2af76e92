"""Backend rules as data: which op patterns a backend quantizes, and with which specs.

A backend is a :class:`QuantScheme` (the spec of activations, weights and biases) plus an
ordered list of :class:`OpRule`. A rule matches a *chain* of ops — an anchor (conv) and the
ops fused after it (relu) — and says, per input of the anchor, which role that edge plays:

=================  ==============================================================
``"act"``          a fresh activation spec on this edge
``"weight"``       the scheme's weight spec (per-channel along ``axis``)
``"bias"``         the scheme's bias spec (int32 derived from input and weight scales
                   for :class:`~qgraph.specs.Int32Bias`), or float when it has none
``"follow"``       share the producer's output qparams; refuse if it is float
``"follow_or_act"`` share the producer's output qparams, else a fresh activation spec
``"list_shared"``  a list argument (cat): all inputs share one set of qparams
=================  ==============================================================

and what the last node of the chain outputs: ``"act"`` (fresh spec), ``"shared"`` (the
qparams of the anchor's first input: pass-through ops such as max-pool and reshape) or
``None`` (float). ``check`` is an optional predicate that returns the *reason* it refuses,
or None; the same predicate can serve the quantizer and an exporter.

Adding an operator to a backend is one entry in its table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.fx

from qgraph.errors import ConfigError
from qgraph.specs import Int32Bias, QuantSpec

InputRole = Literal["act", "weight", "bias", "follow", "follow_or_act", "list_shared"]
OutputRole = Optional[Literal["act", "shared"]]
Check = Callable[[torch.fx.GraphModule, list[torch.fx.Node]], Optional[str]]


@dataclass(frozen=True)
class QuantScheme:
    """The specs one configuration puts on activations, weights and biases."""

    activation: QuantSpec
    weight: QuantSpec
    bias: QuantSpec | Int32Bias | None = None

    def __post_init__(self) -> None:
        if self.activation.is_per_channel:
            raise ConfigError("QuantScheme.activation must not be per-channel: activations use one scale per tensor")
        if self.weight.dynamic:
            raise ConfigError("QuantScheme.weight must not be dynamic: weights are quantized ahead of time")


@dataclass(frozen=True)
class OpRule:
    """One operator pattern of a backend and the roles of its edges."""

    name: str
    chain: tuple[frozenset, ...]
    inputs: dict[int, InputRole] = field(default_factory=dict)
    output: OutputRole = "act"
    check: Check | None = None

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def anchor_ops(self) -> frozenset:
        return self.chain[0]


@dataclass(frozen=True)
class Backend:
    """A named rule table with a default scheme factory."""

    name: str
    rules: Sequence[OpRule]
    default_scheme: Callable[[bool], QuantScheme]
    """``default_scheme(is_qat)``: the backend's int8 scheme for QAT or PTQ."""

    def covered_ops(self) -> frozenset:
        ops: set = set()
        for rule in self.rules:
            ops |= rule.anchor_ops
        return frozenset(ops)


def has_float_output(node: object) -> bool:
    """True for nodes whose recorded value is a float tensor (the only thing we quantize)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point
