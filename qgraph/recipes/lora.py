"""LoRA with quantization in the loop: add adapters to a prepared graph, train, merge or keep.

    prepared = qgraph.prepare_qat(model, (x,), config=config)        # 1. quantize the base model
    tuned = qgraph.add_lora(prepared, r=8, alpha=16, targets=r".*_proj")  # 2. adapters next to it
    opt = torch.optim.AdamW(qgraph.lora_parameters(tuned), lr=1e-3)
    ... train tuned like any nn.Module ...
    unmerged = qgraph.convert(tuned)                    # integer base linears + float adapters
    merged = qgraph.convert(qgraph.merge_lora(tuned))   # W + (alpha/r)·B·A, quantized anew

**Order: ``add_lora`` comes after ``prepare_qat``.** The prepared graph already says which
weights are quantized and with which spec (int8 per-channel, int4 per-group, learnable
ranges — whatever the backend and config chose), so the adapter is placed next to exactly
those fake-quantized linears, and no backend rule ever sees the adapter's own linears:
they stay float by construction, instead of by an exception in every rule table. It also
allows full QAT first and LoRA after. ``prepare_qat`` refuses a graph that already has
adapters. ``add_lora`` on a plain :func:`qgraph.capture` graph gives float LoRA (the fp32
baseline of a comparison).

The base model is frozen: only the adapters train (``train_ranges=True`` also trains
learnable quantizer ranges). After training, :func:`qgraph.convert` keeps each adapter
as a float path beside its quantized linear (exports to ``.pte`` and ``.onnx`` like any
float op), and :func:`merge_lora` folds it into the base weight before ``convert``
quantizes that weight with a freshly observed range. See :mod:`qgraph.passes.lora.add_lora` and
:mod:`qgraph.passes.lora.merge_lora` for the math.
"""

from __future__ import annotations

import os

import torch
import torch.fx
from torch import nn

from qgraph.api.modes import bind_mode_methods, eval_mode, train_mode
from qgraph.core.errors import ConfigError
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import LORA_KEY
from qgraph.core.pass_manager import PassManager
from qgraph.observers.learnable import LearnableFakeQuantize
from qgraph.passes.lora.adapter import LoraAdapter
from qgraph.passes.lora.add_lora import AddLora
from qgraph.passes.lora.merge_lora import MergeLora


def _own_copy(model: torch.fx.GraphModule, what: str) -> torch.fx.GraphModule:
    if not isinstance(model, torch.fx.GraphModule):
        raise ConfigError(
            f"{what} takes a GraphModule from qgraph.prepare_qat (or qgraph.api.capture), got "
            f"{type(model).__name__}; call qgraph.prepare_qat(model, example_inputs) first"
        )
    if "qgraph_converted" in model.meta:
        raise ConfigError(f"{what} takes a prepared model, not a converted one: add or merge adapters before "
                          "qgraph.convert")
    return copy_graph_module(model)


def _finish(gm: torch.fx.GraphModule, training: bool) -> torch.fx.GraphModule:
    bind_mode_methods(gm)
    return train_mode(gm) if training else eval_mode(gm)


def add_lora(
    model: torch.fx.GraphModule,
    r: int = 8,
    alpha: float = 16.0,
    targets: str = r".*",
    dropout: float = 0.0,
    init: str = "kaiming",
    seed: int = 0,
    train_ranges: bool = False,
    fake_quant_merged: bool = False,
    dump_dir: str | os.PathLike | None = None,
) -> torch.fx.GraphModule:
    """A copy of ``model`` with rank-``r`` LoRA adapters on the linears matching ``targets``.

    ``targets`` is a regular expression matched in full against module paths, as in
    ``QConfig.set_module_name`` (``r".*\\.(q_proj|v_proj)"``; a containing module such as
    ``r"layers\\.0"`` selects every linear inside it). Adapters compute
    ``(alpha / r) · B (A x)`` in float from the linear's float input, with ``A`` initialised
    ``"kaiming"`` (uniform, like ``nn.Linear``) or ``"normal"`` (std ``1/r``) from ``seed``
    and ``B = 0``, so the returned model computes exactly what ``model`` computed. Every
    other parameter gets ``requires_grad=False`` (``train_ranges=True`` keeps quantizer
    parameters trainable). ``model`` is not changed. A ``targets`` that matches no linear
    raises :class:`~qgraph.core.errors.ConfigError` listing the graph's linear modules.

    ``fake_quant_merged=True`` trains the merged form instead of a parallel path: the base
    weight's quantizer sees ``W + (alpha/r)·B·A``, so training sees exactly what
    ``convert(merge_lora(model))`` runs (merge before export; there is no unmerged form).
    """
    gm = _own_copy(model, "add_lora")
    training = model.training
    lora = AddLora(r=r, alpha=alpha, targets=targets, dropout=dropout, init=init, seed=seed, train_ranges=train_ranges,
                   fake_quant_merged=fake_quant_merged)
    gm = PassManager([lora], dump_dir=dump_dir, stage="add_lora")(gm)
    return _finish(gm, training)


def merge_lora(model: torch.fx.GraphModule, dump_dir: str | os.PathLike | None = None) -> torch.fx.GraphModule:
    """A copy of ``model`` with every adapter folded into its base weight: ``W + (alpha/r)·B·A``.

    Each merged weight's quantizer re-observes the merged weight, so :func:`qgraph.convert`
    quantizes it with its own range. ``model`` (and its adapters) is not changed, so the
    merged and the unmerged form can both be converted and compared.
    """
    gm = _own_copy(model, "merge_lora")
    training = model.training
    if not gm.meta.get(LORA_KEY):
        raise ConfigError("merge_lora: this model has no LoRA adapters; add them with qgraph.add_lora")
    gm = PassManager([MergeLora()], dump_dir=dump_dir, stage="merge_lora")(gm)
    return _finish(gm, training)


def lora_parameters(model: nn.Module, include_ranges: bool = False) -> list[nn.Parameter]:
    """The adapter parameters (``lora_A``, ``lora_B`` of every adapter), for an optimizer.

    ``include_ranges=True`` adds the learned scales and zero points of the model's
    :class:`~qgraph.observers.learnable.LearnableFakeQuantize` modules (a scheme with
    ``with_learnable_ranges()``, adapters added with ``add_lora(..., train_ranges=True)``):
    the frozen base weights keep their values while their quantization grid and the
    activations' ranges train with the adapters (LSQ).
    """
    params = [p for m in model.modules() if isinstance(m, LoraAdapter) for p in m.parameters()]
    if include_ranges:
        params += [p for m in model.modules() if isinstance(m, LearnableFakeQuantize) for p in m.parameters()]
    return params


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` is a graph with LoRA adapters (``prepare_*`` refuses such graphs)."""
    return isinstance(model, torch.fx.GraphModule) and bool(model.meta.get(LORA_KEY))
