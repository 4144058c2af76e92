"""Backend rules as data: which op patterns a backend quantizes, and with which specs.

A backend is a :class:`QuantScheme` (the spec of activations, weights and biases) plus an
ordered list of :class:`OpRule`. A rule matches a *chain* of ops — an anchor (conv) and the
ops fused after it (relu) — and says, per input of the anchor, which role that edge plays:

=================  ==============================================================
``"act"``          a fresh activation spec on this edge
``"weight"``       the scheme's weight spec (per-channel along ``axis``)
``"bias"``         the scheme's bias spec (int32 derived from input and weight scales
                   for :class:`~qgraph.quant.specs.Int32Bias`), or float when it has none
``"follow"``       share the producer's output qparams; refuse if it is float
``"follow_or_act"`` share the producer's output qparams, else a fresh activation spec
``"list_shared"``  a list argument (cat): all inputs share one set of qparams
=================  ==============================================================

and what the last node of the chain outputs: ``"act"`` (fresh spec), ``"shared"`` (the
qparams of the anchor's first input: pass-through ops such as max-pool and reshape) or
``None`` (float). ``check`` is an optional predicate that returns the *reason* it refuses,
or None; the same predicate can serve the quantizer and an exporter (see :data:`Check`).

Rules are tried in table order and the first that matches a node wins, so a fused pattern
(``conv_relu``) comes before the pattern of its anchor alone (``conv``); :class:`Backend`
refuses a table in which an earlier rule would take the nodes a later one fuses. Backends
share one base table and state their differences with :func:`derive_rules`. Adding an
operator to a backend is one entry in its table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, Sequence

import torch
import torch.fx

from qgraph.core.errors import ConfigError
from qgraph.quant.specs import Int32Bias, PerGroup, QuantSpec

InputRole = Literal["act", "weight", "bias", "follow", "follow_or_act", "list_shared"]
OutputRole = Optional[Literal["act", "shared"]]
Check = Callable[[torch.fx.GraphModule, list[torch.fx.Node]], Optional[str]]
"""``check(gm, chain)``: None when the rule may quantize the matched ``chain`` (anchor first),
else the reason in words. A plain string, not a typed record: the same predicate answers an
exporter that only asks yes or no. The annotate pass files the reason as a
:class:`~qgraph.core.meta.Refusal` of kind ``CHECK_FAILED`` (``OpRule.check``) or
``DYNAMIC_UNSUPPORTED`` (``OpRule.dynamic_check``)."""


@dataclass(frozen=True)
class QuantScheme:
    """The specs one configuration puts on activations, weights and biases.

    ``activation=None`` makes a *weight-only* scheme: only the weights of layers that have one
    (linear, embedding) are quantized, activations and outputs stay float (int4 weight-only
    LLM layers, quantized embedding tables).
    """

    activation: QuantSpec | None
    weight: QuantSpec
    bias: QuantSpec | Int32Bias | None = None

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation.is_per_channel:
            raise ConfigError("QuantScheme.activation must not be per-channel: activations use one scale per tensor")
        if self.activation is not None and isinstance(self.activation.granularity, PerGroup):
            raise ConfigError(
                "QuantScheme.activation must not be per-group: group-wise scales are for weights; "
                "use PerToken() with dynamic=True for per-row activation ranges"
            )
        if self.weight.dynamic:
            raise ConfigError("QuantScheme.weight must not be dynamic: weights are quantized ahead of time")
        if self.activation is None and self.bias is not None:
            raise ConfigError("QuantScheme.bias must be None in a weight-only scheme (activation=None)")
        if self.activation is not None and self.activation.dynamic and isinstance(self.bias, Int32Bias):
            raise ConfigError(
                "QuantScheme.bias=Int32Bias() with a dynamic activation: the input scale is known only at "
                "run time, so the bias stays float (bias=None)"
            )

    @property
    def is_dynamic(self) -> bool:
        """Activations quantized per batch at run time (no calibration, no output quantizer)."""
        return self.activation is not None and self.activation.dynamic

    @property
    def is_weight_only(self) -> bool:
        """Only weights are quantized (``activation=None``)."""
        return self.activation is None

    def with_histogram(self, range_method: str = "mse", percentile: float | None = None) -> "QuantScheme":
        """A copy whose activations are calibrated by the histogram observer (PTQ).

        ``range_method`` is ``"mse"``, ``"entropy"`` or ``"percentile"`` (with ``percentile``,
        default 99.99); weights keep their per-channel min-max ranges. See :mod:`qgraph.observers.histogram`.
        """
        if self.activation is None or self.activation.dynamic:
            raise ConfigError("QuantScheme.with_histogram: this scheme has no static activation spec to calibrate")
        act = self.activation.with_(observer="histogram", range_method=range_method, percentile=percentile)
        return QuantScheme(activation=act, weight=self.weight, bias=self.bias)

    def with_learnable_ranges(self, activation: bool = True, weight: bool = True) -> "QuantScheme":
        """A copy whose activation and / or weight ranges QAT learns (LSQ, :mod:`qgraph.observers.learnable`)."""
        act = self.activation
        if activation and act is not None and not act.dynamic:
            act = act.with_(learnable=True)
        weight_spec = self.weight.with_(learnable=True) if weight else self.weight
        return QuantScheme(activation=act, weight=weight_spec, bias=self.bias)


@dataclass(frozen=True)
class OpRule:
    """One operator pattern of a backend and the roles of its edges."""

    name: str
    chain: tuple[frozenset, ...]
    inputs: dict[int, InputRole] = field(default_factory=dict)
    output: OutputRole = "act"
    check: Check | None = None
    dynamic: tuple[type, ...] = ()
    """Granularities (``PerTensor``, ``PerToken``) of a dynamic activation this rule accepts.
    With a dynamic scheme its ``"act"`` inputs are quantized per batch at run time and its
    output stays float; a rule with ``()`` refuses dynamic schemes. Only ops with a constant
    weight (conv, linear) have a dynamic form in the runtimes."""
    needs_weight_only: bool = False
    """The rule applies only with a weight-only scheme (``activation=None``): an embedding,
    whose input is indices, is quantized weight-only or not at all."""
    dynamic_check: Check | None = None
    """A further check that applies only with a dynamic scheme: where the runtime's dynamic
    kernels cover less than its static ones (XNNPACK has no dynamic depthwise conv)."""

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
    dynamic_scheme: Callable[..., QuantScheme] | None = None
    """``dynamic_scheme(per_token=False)``: weights int8 ahead of time, activations per batch."""
    dynamic_linear_per_token: bool = False
    """The runtime chooses a dynamic linear's input range per row (XNNPACK's ``qd8``), so the
    faithful default quantizes linear inputs per token (convs stay per tensor)."""

    def __post_init__(self) -> None:
        twice = sorted(name for name, n in Counter(r.name for r in self.rules).items() if n > 1)
        if twice:
            raise ConfigError(f"backend {self.name!r}: rule names {twice} appear more than once; name each rule once")
        for i, early in enumerate(self.rules):
            for late in self.rules[i + 1 :]:
                why = _takes_nodes_of(early, late)
                if why:
                    raise ConfigError(
                        f"backend {self.name!r}: rule {early.name!r} comes before {late.name!r} but {why}, "
                        f"so {late.name!r} would never match there; put {late.name!r} first"
                    )

    def covered_ops(self) -> frozenset:
        ops: set = set()
        for rule in self.rules:
            ops |= rule.anchor_ops
        return frozenset(ops)


def _takes_nodes_of(early: OpRule, late: OpRule) -> str | None:
    """Why ``early``, tried first, would annotate the nodes ``late`` needs, or None.

    The first rule to match a node wins: a rule with the same anchor and a shorter chain
    takes every anchor the longer one would fuse, and a rule anchored on an op that a later
    rule fuses after its anchor takes that op out of the later chain.
    """
    if early.anchor_ops & late.anchor_ops and len(early.chain) < len(late.chain):
        return "it matches the same anchor ops with a shorter chain"
    if any(early.anchor_ops & ops for ops in late.chain[1:]):
        return f"it is anchored on ops that {late.name!r} fuses after its anchor"
    return None


def derive_rules(
    base: Sequence[OpRule], *, remove: Sequence[str] = (), add_before: Mapping[str, OpRule] | None = None
) -> tuple[OpRule, ...]:
    """``base`` less the rules named in ``remove``, with each rule of ``add_before`` placed
    just before the base rule it is keyed by (``{"mul": mul_relu}``: the fused pattern is
    tried before the anchor alone). Every other rule keeps its place and is the base's object.
    A name that is not in ``base`` is an error, so a renamed base rule cannot silently
    leave a backend's difference unapplied."""
    add_before = dict(add_before or {})
    names = [r.name for r in base]
    unknown = sorted((set(remove) | set(add_before)) - set(names))
    if unknown:
        raise ConfigError(f"derive_rules: {unknown} name no rule of the base table {names}")
    derived: list[OpRule] = []
    for rule in base:
        if rule.name in add_before:
            derived.append(add_before[rule.name])
        if rule.name not in remove:
            derived.append(rule)
    return tuple(derived)


def has_float_output(node: object) -> bool:
    """True for nodes whose recorded value is a float tensor (the only thing we quantize)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point
