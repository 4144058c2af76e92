"""Annotate: the backend's rules write a :class:`QuantAnnotation` into ``node.meta``.

Rules are tried in table order; within a rule, nodes in graph order, so pass-through rules
see the annotations of their producers. A rule matches a chain ``anchor → f1 → f2`` when
every follower is the only user of the node before it and no node of the chain is
annotated yet. The anchor's inputs get specs by role (see :mod:`qgraph.quant.rules`); the last
node of the chain gets the output spec; the followers carry an annotation with no specs,
which marks them as fused (no quantizer inside the chain).

With a dynamic scheme (``scheme.is_dynamic``) only rules that list the activation's
granularity in ``OpRule.dynamic`` match (conv, linear); their ``"act"`` inputs get the
dynamic spec and their output stays float.

A *dynamic* scheme quantizes only the inputs of rules with a dynamic form (conv, linear) and
leaves outputs float; a *weight-only* scheme (``activation=None``) only the weights of rules
that have one (linear, embedding). A weight spec that cannot apply to a given weight (per-group
scales whose group size does not divide the input features) is a refusal with that reason.

Why a node was not matched is recorded per rule as a :class:`~qgraph.core.meta.Refusal`
(rule, reason, :class:`~qgraph.core.meta.RefusalKind`) and left under ``REFUSALS_KEY`` on every
conv and linear that stays float; ``debug_node="conv2d_3"`` (or env ``QGRAPH_DEBUG_NODE``) logs
each refusal as it happens, and ``strict`` config turns an unquantized conv or linear into an
error. A rule's ``check`` returns its reason as a string (the predicate contract it shares with
the exporters, :data:`~qgraph.quant.rules.Check`); this pass gives it its kind:
``CHECK_FAILED`` for ``check``, ``DYNAMIC_UNSUPPORTED`` for ``dynamic_check``.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import warnings

import torch
import torch.fx

from qgraph.core.errors import ConfigError, UnsupportedOperatorError
from qgraph.core.graph import is_op, single_user
from qgraph.core.meta import ANNOTATION_KEY, FOLDED_INTO_KEY, REFUSALS_KEY, Refusal, RefusalKind
from qgraph.core.node_info import describe_node
from qgraph.core.opsets import CONV_OPS, LINEAR_OPS
from qgraph.core.pass_manager import Pass, PassResult
from qgraph.quant.config import QConfig
from qgraph.quant.rules import Backend, OpRule, QuantScheme, has_float_output
from qgraph.quant.specs import AnySpec, DerivedSpec, Int32Bias, PerGroup, QuantAnnotation, QuantSpec, SharedSpec

log = logging.getLogger("qgraph.annotate")

MUST_QUANTIZE_OPS = CONV_OPS | LINEAR_OPS


class Annotate(Pass):
    """Write the backend's quant specs into ``node.meta['qgraph_annotation']``."""

    name = "annotate"

    def __init__(self, backend: Backend, is_qat: bool, config: QConfig | None = None, debug_node: str | None = None):
        self.backend = backend
        self.config = config or QConfig()
        self.default = backend.default_scheme(is_qat)
        self.debug_node = debug_node or os.environ.get("QGRAPH_DEBUG_NODE")
        self.debug_node_given = debug_node is not None
        self.refusals: dict[str, list[Refusal]] = {}

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self._check_debug_node(gm)
        self.kept_float = self._first_and_last(gm) if self.config.keep_first_last_float else set()
        modified = False
        for rule in self.backend.rules:
            for node in gm.graph.nodes:
                if is_op(node, rule.anchor_ops):
                    modified |= self._try(gm, rule, node)
        self._report_unquantized(gm)
        return PassResult(gm, modified)

    def _check_debug_node(self, gm: torch.fx.GraphModule) -> None:
        """A ``debug_node`` that names no node would log nothing: say so, with the closest names."""
        if self.debug_node is None:
            return
        names = [n.name for n in gm.graph.nodes]
        if self.debug_node in names:
            return
        close = difflib.get_close_matches(self.debug_node, names, n=3, cutoff=0.5)
        source = "debug_node" if self.debug_node_given else "QGRAPH_DEBUG_NODE"
        raise ConfigError(
            f"{source}={self.debug_node!r} names no node of the graph the backend rules see"
            f"{' (closest: ' + ', '.join(map(repr, close)) + ')' if close else ''}; "
            "node names are in the prepare dumps (dump_dir=...)"
        )

    # -- matching ---------------------------------------------------------------------
    def _try(self, gm: torch.fx.GraphModule, rule: OpRule, anchor: torch.fx.Node) -> bool:
        if ANNOTATION_KEY in anchor.meta:
            return False
        match = self._match(gm, rule, anchor)
        if isinstance(match, Refusal):
            self.refusals.setdefault(anchor.name, []).append(match)
            if self.debug_node == anchor.name:
                log.warning("node %s: rule %s refused: %s [%s]", anchor.name, rule.name, match.reason, match.kind.name)
            return False
        chain, scheme, inputs = match
        last = chain[-1]
        output: AnySpec | None = None
        if scheme.is_dynamic or scheme.is_weight_only:
            pass  # float output: a dynamic layer's consumer picks its own range at run time
        elif rule.output == "act":
            output = scheme.activation
        elif rule.output == "shared":
            first = _first_tensor_input(anchor)
            output = SharedSpec((first.name, anchor.name)) if first is not None else None
        anchor.meta[ANNOTATION_KEY] = QuantAnnotation(rule.name, anchor.name, inputs, output if last is anchor else None)
        for follower in chain[1:]:
            follower.meta[ANNOTATION_KEY] = QuantAnnotation(
                rule.name, anchor.name, {}, output if follower is last else None
            )
        return True

    def _match(
        self, gm: torch.fx.GraphModule, rule: OpRule, anchor: torch.fx.Node
    ) -> tuple[list[torch.fx.Node], QuantScheme, dict[str, AnySpec]] | Refusal:
        """The chain, scheme and input specs of ``rule`` at ``anchor``, or why it refuses."""
        fail = functools.partial(Refusal, rule.name)
        chain = self._chain(rule, anchor)
        if isinstance(chain, Refusal):
            return chain
        if any(ANNOTATION_KEY in n.meta for n in chain):
            return fail("part of the pattern is already matched by another rule", RefusalKind.ALREADY_MATCHED)
        if anchor.name in self.kept_float:
            why = "QConfig(keep_first_last_float=True) keeps the first and last conv / linear in float"
            return fail(why, RefusalKind.CONFIG_FLOAT)
        scheme = self.config.scheme_for(anchor, self.default)
        if scheme is None:
            return fail("the config keeps this node in float (scheme None)", RefusalKind.CONFIG_FLOAT)
        if scheme.is_dynamic and type(scheme.activation.granularity) not in rule.dynamic:
            granularity = type(scheme.activation.granularity).__name__
            why = f"no dynamic form with {granularity} activations" if rule.dynamic else "no dynamic form"
            why += " (dynamic quantization covers layers with a constant weight)"
            return fail(why, RefusalKind.DYNAMIC_UNSUPPORTED)
        if scheme.is_weight_only and "weight" not in rule.inputs.values():
            return fail("a weight-only scheme quantizes only layers with a weight", RefusalKind.WEIGHT_ONLY)
        if rule.needs_weight_only and not scheme.is_weight_only:
            why = "quantized only by a weight-only scheme (activation=None), e.g. qgraph.embedding_weight_only()"
            return fail(why, RefusalKind.NEEDS_WEIGHT_ONLY)
        checks = [(rule.check, RefusalKind.CHECK_FAILED)]
        if scheme.is_dynamic:
            checks.append((rule.dynamic_check, RefusalKind.DYNAMIC_UNSUPPORTED))
        for check, kind in checks:
            reason = check(gm, chain) if check is not None else None
            if reason:
                return fail(reason, kind)
        inputs = self._input_specs(rule, anchor, scheme)
        if isinstance(inputs, Refusal):
            return inputs
        return chain, scheme, inputs

    def _chain(self, rule: OpRule, anchor: torch.fx.Node) -> list[torch.fx.Node] | Refusal:
        nodes = [anchor]
        # Nodes that QAT batch-norm folding attached to this anchor belong to it.
        while (nxt := single_user(nodes[-1])) is not None and nxt.meta.get(FOLDED_INTO_KEY) == anchor.name:
            nodes.append(nxt)
        for ops in rule.chain[1:]:
            nxt = single_user(nodes[-1])
            if nxt is None or not is_op(nxt, ops):
                why = f"'{nodes[-1].name}' is not followed by a single {sorted(map(str, ops))[0]}-like op"
                return Refusal(rule.name, why, RefusalKind.NOT_MATCHED)
            nodes.append(nxt)
        return nodes

    def _input_specs(self, rule: OpRule, anchor: torch.fx.Node, scheme: QuantScheme) -> dict[str, AnySpec] | Refusal:
        specs: dict[str, AnySpec] = {}
        for index, role in rule.inputs.items():
            if index >= len(anchor.args) or anchor.args[index] is None:
                continue
            arg = anchor.args[index]
            if role == "list_shared":
                items = [a for a in arg if isinstance(a, torch.fx.Node)]
                if not items or not all(has_float_output(a) for a in items):
                    return Refusal(rule.name, "inputs are not all float tensors", RefusalKind.UNSUPPORTED_DTYPE)
                first = items[0]
                specs[first.name] = _follow(first) or scheme.activation
                for other in items[1:]:
                    specs.setdefault(other.name, SharedSpec((first.name, anchor.name)))
                continue
            if not isinstance(arg, torch.fx.Node):
                continue
            if role == "act":
                if scheme.activation is not None:  # weight-only: the input stays float
                    specs[arg.name] = scheme.activation
            elif role == "weight":
                misfit = _weight_misfit(arg, scheme.weight)
                if misfit:
                    return Refusal(rule.name, misfit, RefusalKind.SPEC_MISFIT)
                specs[arg.name] = scheme.weight
            elif role == "bias":
                if isinstance(scheme.bias, Int32Bias):
                    specs[arg.name] = _derived_bias(rule, anchor, scheme.bias)
                elif scheme.bias is not None:
                    specs[arg.name] = scheme.bias
            elif role in ("follow", "follow_or_act"):
                shared = _follow(arg)
                if shared is None and role == "follow":
                    why = f"input '{arg.name}' is not quantized, so there are no qparams to pass through"
                    return Refusal(rule.name, why, RefusalKind.FLOAT_PRODUCER)
                specs[arg.name] = shared or scheme.activation
        return specs

    @staticmethod
    def _first_and_last(gm: torch.fx.GraphModule) -> set[str]:
        layers = [n.name for n in gm.graph.nodes if is_op(n, MUST_QUANTIZE_OPS)]
        return {layers[0], layers[-1]} if layers else set()

    # -- reporting ----------------------------------------------------------------------
    def _report_unquantized(self, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if not is_op(node, MUST_QUANTIZE_OPS) or ANNOTATION_KEY in node.meta:
                continue
            tried = self.refusals.get(node.name, [])
            node.meta[REFUSALS_KEY] = list(tried)
            if any(r.kind is RefusalKind.CONFIG_FLOAT for r in tried):
                continue  # the user asked for float here
            reasons = "; ".join(map(str, tried)) or "no rule of this backend covers it"
            msg = (
                f"{describe_node(node)} stays in float on backend '{self.backend.name}' ({reasons}). "
                "Keep it in float explicitly with QConfig.set_module_name(..., None), or add a rule for it."
            )
            if self.config.strict:
                raise UnsupportedOperatorError(msg)
            warnings.warn(msg, stacklevel=2)


def _weight_misfit(weight: torch.fx.Node, spec: QuantSpec) -> str | None:
    """Why ``spec`` cannot quantize this weight, or None: per-group scales need a 2-D weight
    whose last dimension (a linear's ``in_features``) is a multiple of the group size."""
    if not isinstance(spec.granularity, PerGroup):
        return None
    val = weight.meta.get("val")
    shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    size = spec.granularity.group_size
    if shape is None or len(shape) != 2:
        return f"group-wise weights need a 2-D weight (linear, embedding), '{weight.name}' has shape {shape}"
    if shape[1] % size:
        return f"weight '{weight.name}' {list(shape)}: {shape[1]} input features are not a multiple of group size {size}"
    return None


def _follow(producer: torch.fx.Node) -> SharedSpec | None:
    """Share the producer's output qparams when it has an output spec."""
    ann = producer.meta.get(ANNOTATION_KEY)
    if ann is not None and ann.output is not None:
        return SharedSpec(producer.name)
    return None


def _first_tensor_input(node: torch.fx.Node) -> torch.fx.Node | None:
    arg = node.args[0] if node.args else None
    if isinstance(arg, (list, tuple)):
        arg = next((a for a in arg if isinstance(a, torch.fx.Node)), None)
    return arg if isinstance(arg, torch.fx.Node) else None


def _derived_bias(rule: OpRule, anchor: torch.fx.Node, bias: Int32Bias) -> DerivedSpec:
    """The bias spec ``scale = scale(input edge) × scale(weight edge)`` of this anchor."""
    act = next(i for i, r in rule.inputs.items() if r == "act")
    weight = next(i for i, r in rule.inputs.items() if r == "weight")
    points = tuple((anchor.args[i].name, anchor.name) for i in (act, weight))
    return DerivedSpec(points=points, dtype=bias.dtype)
