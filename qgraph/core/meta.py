"""The keys under which qgraph keeps its records in ``node.meta`` and ``GraphModule.meta``.

A pass that leaves something on a node for a later pass, a mode switch or a tool writes it
under one of these keys, and the record's type is named beside the key. Each key has one
home: here. Records whose fields are quantization specs are defined with the specs
(:class:`~qgraph.quant.specs.QuantAnnotation`, :class:`~qgraph.passes.prepare.resolve_specs.QuantGroup`);
records of plain graph facts are defined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# --- node.meta --------------------------------------------------------------------------

ANNOTATION_KEY = "qgraph_annotation"
"""A node's :class:`~qgraph.quant.specs.QuantAnnotation`: the specs the backend's rule put on
its inputs and output (written by ``annotate``)."""

REFUSALS_KEY = "qgraph_refusals"
"""A list of :class:`Refusal`: why each backend rule that was tried on a node refused it
(written by ``annotate`` on the convs and linears it leaves float, and by ``add_lora`` on an
adapter's layers; read by ``coverage``, the dumps and the ``strict`` / warning report)."""

GROUPS_KEY = "qgraph_groups"
"""``GraphModule.meta``: the :class:`~qgraph.passes.prepare.resolve_specs.QuantGroup` list of
points that share one set of qparams (written by ``resolve_specs``)."""

DERIVED_KEY = "qgraph_derived"
"""``GraphModule.meta``: derived specs (int32 bias = input scale × weight scale) by point."""

QUANTIZER_KEY = "qgraph_quantizer"
"""On a ``call_module`` node of an observer / fake-quant module: the point it quantizes."""

FOLDED_INTO_KEY = "qgraph_folded_into"
"""The name of the conv whose simulated batch norm this node belongs to (QAT train form)."""

SIMULATED_BN_KEY = "qgraph_simulated_bn"
"""On a QAT conv: its :class:`~qgraph.passes.prepare.simulated_bn.SimulatedBn`."""

EVAL_FORM_KEY = "qgraph_bn_eval_form"
"""The name of the conv whose eval-form bias (``(b - mean) * s + beta``) this node computes."""

LORA_KEY = "qgraph_lora"
"""On a linear with an adapter: the adapter's module path."""

LORA_BASE_KEY = "qgraph_lora_base"
"""On the nodes an adapter added: the name of the linear they adapt."""

REFERENCE_KEY = "qgraph_reference"
"""On every integer node ``lower_reference`` creates: its :class:`LoweredFrom`."""

TRAIN_DROPOUT_KEY = "qgraph_train_dropout_p"
"""On an attention op: the ``dropout_p`` it was captured with in training."""

# --- GraphModule.meta -------------------------------------------------------------------

PREPARED_KEY = "qgraph_prepared"
"""``{"backend": name, "qat": bool}`` on a graph ``prepare_*`` returned."""

CONVERTED_KEY = "qgraph_converted"
"""``{"backend": name}`` on a graph ``convert`` returned."""

LOWERED_KEY = "qgraph_lowered"
"""``{"target": name, "runtime": name}`` on a graph ``qgraph.lower`` returned."""

PT2E_ANNOTATION_KEY = "quantization_annotation"
"""Where a torchao / ExecuTorch PT2E ``Quantizer`` writes its ``QuantizationAnnotation`` (their key)."""

PT2E_PLAN_KEY = "qgraph_pt2e_plan"
"""The :class:`~qgraph.passes.prepare.pt2e_plan.Pt2ePlan` that ``pt2e_annotate`` leaves for
``apply_pt2e_annotations``."""

BN_FROZEN_KEY = "qgraph_bn_frozen"
"""True once ``freeze_bn_stats`` froze every batch norm's statistics."""

SYNC_BN_KEY = "qgraph_sync_batch_norm"
"""True on a QAT graph whose batch norms take their training statistics from the global batch
of all ranks (set by :func:`qgraph.sync_batch_norm`)."""


@dataclass(frozen=True)
class LoweredFrom:
    """What an integer node replaced: the quantize node (its name in the converted graph),
    the pattern (``conv_relu``, ``add``, ``quantize``, ...) and the anchor op's node name."""

    quantize: str
    pattern: str
    anchor: str


class RefusalKind(Enum):
    """Why a rule refused a node, as a category that code can act on without reading the text.

    The kinds are those the annotate pass meets, in the order it tests for them on a node
    (``DYNAMIC_UNSUPPORTED`` also after the rule's check: ``OpRule.dynamic_check``), and the
    one ``add_lora`` leaves on an adapter's layers.
    """

    NOT_MATCHED = "the ops after the anchor are not the ones the rule fuses"
    ALREADY_MATCHED = "part of the pattern is matched by an earlier rule"
    CONFIG_FLOAT = "the config keeps the node in float"
    DYNAMIC_UNSUPPORTED = "the runtime has no dynamically quantized form of it"
    WEIGHT_ONLY = "a weight-only scheme quantizes only layers with a weight"
    NEEDS_WEIGHT_ONLY = "the rule applies only with a weight-only scheme"
    CHECK_FAILED = "the rule's check refused"
    UNSUPPORTED_DTYPE = "an input is not a float tensor"
    FLOAT_PRODUCER = "an input that must pass its qparams through is not quantized"
    SPEC_MISFIT = "the scheme's weight spec cannot apply to this weight"
    LORA = "a LoRA adapter's float path"
    NOT_ANNOTATED = "the PT2E quantizer left it unannotated"


@dataclass(frozen=True)
class Refusal:
    """One rule's refusal of one node: the rule's name, the reason in words, and its kind.

    ``kind`` is what code decides on (the report skips :attr:`RefusalKind.CONFIG_FLOAT`, the
    user asked for it); ``reason`` is for people and names the node, argument or shape.
    """

    rule: str
    reason: str
    kind: RefusalKind

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"
