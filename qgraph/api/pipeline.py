"""The public pipeline: capture → prepare (QAT or PTQ) → calibrate / train → convert.

Every function takes and returns plain ``torch.fx.GraphModule`` objects, so the prepared
model trains with ordinary PyTorch code. Nothing here mutates the caller's model: prepare
and convert work on deep copies.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn
from tqdm.auto import tqdm

from qgraph.api.capture import capture, capture_program
from qgraph.api.distributed import gather_full_model
from qgraph.api.inputs import INPUTS_KEY, batch_inputs, install_input_check, record_inputs, split_inputs
from qgraph.api.modes import bind_mode_methods, eval_mode, train_mode
from qgraph.backends import get_backend
from qgraph.core.distributed import rank
from qgraph.core.errors import CalibrationError, ConfigError
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import CONVERTED_KEY, LORA_KEY, PREPARED_KEY
from qgraph.core.pass_manager import PassManager
from qgraph.observers.base import QUANTIZER_TYPES
from qgraph.passes.convert.fold_bn import FoldBn
from qgraph.passes.convert.freeze_qparams import FreezeQparams
from qgraph.passes.convert.quantize_weights import QuantizeWeights
from qgraph.passes.prepare.annotate import Annotate
from qgraph.passes.prepare.apply_pt2e_annotations import ApplyPt2eAnnotations
from qgraph.passes.prepare.chunk_to_slices import ChunkToSlices
from qgraph.passes.prepare.fold_conv_bn import FoldConvBn
from qgraph.passes.prepare.fuse_conv_bn_qat import FuseConvBnQat
from qgraph.passes.prepare.insert_quantizers import InsertQuantizers
from qgraph.passes.prepare.pt2e_annotate import Pt2eAnnotate, is_pt2e_quantizer
from qgraph.passes.prepare.remove_dropout import RemoveDropout
from qgraph.passes.prepare.resolve_specs import ResolveSpecs
from qgraph.passes.prepare.stochastic_depth import StochasticDepth
from qgraph.quant.config import QConfig


def _graph_of(model: nn.Module, example_inputs: Any, dynamic_shapes: Any) -> tuple[torch.fx.GraphModule, bool]:
    """A private GraphModule for ``model`` and whether the model was in training mode.

    An ``ExportedProgram`` has no mode of its own: QAT prepares it for training, PTQ for eval.
    """
    if isinstance(model, (torch.fx.GraphModule, torch.export.ExportedProgram)):
        if dynamic_shapes is not None:
            raise ConfigError(
                "dynamic_shapes applies when qgraph captures the model; this one is captured already: "
                "pass the nn.Module, or capture it again with qgraph.capture(model, inputs, dynamic_shapes)"
            )
        if isinstance(model, torch.export.ExportedProgram):
            return capture_program(model), True
        gm = copy_graph_module(model)
        if INPUTS_KEY not in gm.meta:
            record_inputs(gm)
        return install_input_check(gm), model.training
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be an nn.Module, an ExportedProgram or a captured GraphModule, got {type(model).__name__}"
        )
    return capture(model, example_inputs, dynamic_shapes), model.training


def _check_model(model: Any, fn: str) -> None:
    """Refuse a model that is already prepared or converted, or has float64 parameters.

    Preparing twice would put a second quantizer on every edge (and a converted model has
    integer weights); qgraph's quantize ops and observers work in float32, so a float64
    model would fail only at convert.
    """
    meta = getattr(model, "meta", {}) if isinstance(model, torch.fx.GraphModule) else {}
    if CONVERTED_KEY in meta:
        raise ConfigError(
            f"{fn}: this model is already converted (quantize / dequantize ops, integer weights); "
            f"pass the float model to {fn}"
        )
    holds_quantizers = isinstance(model, nn.Module) and any(isinstance(m, QUANTIZER_TYPES) for m in model.modules())
    if PREPARED_KEY in meta or holds_quantizers:
        raise ConfigError(
            f"{fn}: this model is already prepared (it holds observers or fake-quant modules); "
            "calibrate or train it and call qgraph.convert, or pass the float model to prepare it again"
        )
    if isinstance(model, nn.Module):
        for name, tensor in model.named_parameters():
            if tensor.dtype == torch.float64:
                raise ConfigError(
                    f"{fn}: '{name}' is float64; qgraph quantizes float32 models (observers and quantize ops "
                    "work in float32). Pass model.float() and float32 example inputs."
                )



def _prepare(
    model, example_inputs, backend, config, dump_dir, debug_node, is_qat: bool, dynamic_shapes: Any = None
) -> torch.fx.GraphModule:
    if is_pt2e_quantizer(backend):
        if config is not None:
            raise ConfigError(
                "config= applies to qgraph's backends; a PT2E quantizer carries its own configuration "
                "(set_global / set_module_name / set_module_type on the quantizer)"
            )
        rules = None
    else:
        rules = get_backend(backend)
    if config is not None and not isinstance(config, QConfig):
        raise ConfigError(f"config must be a qgraph.QConfig or None, got {type(config).__name__}")
    _check_operators(config, rules)
    if isinstance(model, torch.fx.GraphModule) and model.meta.get(LORA_KEY):
        raise ConfigError(
            "this graph already has LoRA adapters; prepare the base model first and add adapters after: "
            "qgraph.add_lora(qgraph.prepare_qat(model, example_inputs), ...)"
        )
    _check_model(model, "prepare_qat" if is_qat else "prepare_ptq")
    gm, training = _graph_of(model, example_inputs, dynamic_shapes)
    if config is not None:
        config.check_module_names(gm)
    if not is_qat:
        eval_mode(gm)
    fuse = FuseConvBnQat() if is_qat else FoldConvBn()
    if rules is None:  # like torchao: QAT annotates before folding conv + BN, PTQ after
        pt2e = Pt2eAnnotate(backend)
        annotate = [pt2e, fuse] if is_qat else [fuse, pt2e]
        annotate.append(ApplyPt2eAnnotations())
    else:
        annotate = [fuse, Annotate(rules, is_qat, config, debug_node)]
    passes = [StochasticDepth(), ChunkToSlices(), *annotate, ResolveSpecs(), InsertQuantizers(is_qat)]
    gm = PassManager(passes, dump_dir=dump_dir, stage="prepare_qat" if is_qat else "prepare_ptq")(gm)
    name = rules.name if rules is not None else f"pt2e:{type(backend).__name__}"
    gm.meta[PREPARED_KEY] = {"backend": name, "qat": is_qat}
    bind_mode_methods(gm)
    return train_mode(gm) if (is_qat and training) else eval_mode(gm)


def _check_operators(config: QConfig | None, backend) -> None:
    if config is None or backend is None:
        return
    covered = backend.covered_ops()
    for op, scheme in config.operators.items():
        overloads = {op} if not hasattr(op, "overloads") else {getattr(op, o) for o in op.overloads()}
        if scheme is not None and not overloads & covered:
            raise ConfigError(
                f"config.operators names {op}, which backend '{backend.name}' has no rule for; "
                "remove it from the config or add a rule to the backend's table"
            )


def prepare_qat(
    model: nn.Module,
    example_inputs: Any,
    backend: str = "xnnpack",
    config: QConfig | None = None,
    dump_dir: str | os.PathLike | None = None,
    debug_node: str | None = None,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    """Capture ``model`` and insert fake-quant modules for quantization-aware training.

    Conv + BN pairs are rewritten so that the BN-folded weight is fake-quantized while BN
    keeps training. The result is an ``nn.Module``: train it with your usual loop, switch
    with ``.train()`` / ``.eval()`` (or :func:`qgraph.train_mode` / :func:`qgraph.eval_mode`).

    ``model`` may also be a ``torch.export.ExportedProgram``, used instead of capturing (it is
    not changed). ``backend`` is ``"xnnpack"``, ``"x86"`` or a PT2E ``Quantizer`` (torchao /
    ExecuTorch, e.g. ``XNNPACKQuantizer().set_global(...)``), whose annotations then decide
    every spec (see :mod:`qgraph.passes.prepare.pt2e_annotate`); ``config`` must be None then.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs
    (``{"input_ids": ids, "attention_mask": mask}``); the batch stays dynamic, a batch-1
    example included. ``dynamic_shapes`` makes more dims dynamic, by input name:
    ``{"x": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}`` (see :func:`qgraph.capture`). The
    prepared model checks every call against the captured inputs (names, dtypes, static sizes).
    """
    return _prepare(model, example_inputs, backend, config, dump_dir, debug_node, True, dynamic_shapes)


def prepare_ptq(
    model: nn.Module,
    example_inputs: Any,
    backend: str = "xnnpack",
    config: QConfig | None = None,
    dump_dir: str | os.PathLike | None = None,
    debug_node: str | None = None,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    """Capture ``model`` in eval mode, fold BN into convs and insert observers for calibration.

    ``model`` and ``backend`` take the same forms, ``example_inputs`` and ``dynamic_shapes``
    the same meaning as in :func:`prepare_qat`.
    """
    return _prepare(model, example_inputs, backend, config, dump_dir, debug_node, False, dynamic_shapes)


def calibrate(
    prepared: torch.fx.GraphModule,
    batches: Iterable[Any],
    progress: bool = True,
    *,
    input_fn: Callable[[Any], Any] | None = None,
    num_batches: int | None = None,
) -> torch.fx.GraphModule:
    """Run ``batches`` through a PTQ-prepared model; observers record ranges.

    ``batches`` is any iterable, a ``DataLoader`` included. Each batch gives the model's inputs:
    a tensor is its one input; a tuple or list gives its leading elements, as many as the model
    takes (``(images, labels)`` → ``images``); a dict gives the keyword inputs the model was
    captured with (``labels`` and other keys are left out). ``input_fn(batch)`` picks the
    inputs itself (a tensor, a tuple of positional inputs or a dict of keyword inputs, taken
    as they are). ``num_batches`` stops after that many batches.

    Runs in eval mode without gradients. An input that does not match the captured ones
    raises :class:`~qgraph.core.errors.InputError`; NaN or inf raises
    :class:`~qgraph.core.errors.CalibrationError` naming the first quantized node that saw it.

    In several processes each rank passes its own shard, the same number of batches on
    every rank; observers then record the ranges of the global batches (at step ``i``, the
    concatenation of every rank's ``i``-th batch), so every rank holds what one
    process calibrated on all shards holds — bit for bit where the model computes each sample
    the same in any batch (:mod:`qgraph.api.distributed`).
    The progress bar shows on rank 0.
    """
    if not isinstance(prepared, torch.fx.GraphModule) or PREPARED_KEY not in prepared.meta:
        raise ConfigError("calibrate() takes the model returned by qgraph.prepare_ptq (or prepare_qat)")
    if isinstance(batches, torch.Tensor):
        raise ConfigError(
            "calibrate() takes an iterable of batches; one tensor would be taken row by row as batches "
            "without their batch dim: pass [x]"
        )
    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"num_batches must be a positive number of batches, got {num_batches}")
    eval_mode(prepared)
    seen = 0
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
        total = num_batches if total is None else min(total, num_batches)
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="calibrate", disable=not progress or rank() != 0, leave=False):
            args, kwargs = split_inputs(input_fn(batch)) if input_fn else batch_inputs(prepared, batch)
            prepared(*args, **kwargs)
            seen += 1
    if seen == 0:
        raise CalibrationError("calibrate() got no batches; pass an iterable of example inputs")
    return prepared


def convert(prepared: torch.fx.GraphModule, dump_dir: str | os.PathLike | None = None) -> torch.fx.GraphModule:
    """Turn a prepared (and trained or calibrated) model into quantize/dequantize form.

    BN is folded, observers and fake-quant modules become ``quantized_decomposed`` quantize
    / dequantize ops, and weights are stored as int8 tensors. The prepared model is not
    changed. A DDP wrapper converts its module; a graph sharded by FSDP2's ``fully_shard``
    is gathered first (call ``convert`` on every rank then; see :mod:`qgraph.api.distributed`).
    """
    prepared = gather_full_model(prepared)
    if not isinstance(prepared, torch.fx.GraphModule) or PREPARED_KEY not in prepared.meta:
        raise ConfigError("convert() takes the model returned by qgraph.prepare_qat or qgraph.prepare_ptq")
    gm = eval_mode(copy_graph_module(prepared))
    passes = [FoldBn(), RemoveDropout(), FreezeQparams(), QuantizeWeights()]
    gm = PassManager(passes, dump_dir=dump_dir, stage="convert")(gm)
    gm.meta[CONVERTED_KEY] = {"backend": gm.meta.pop(PREPARED_KEY)["backend"]}
    bind_mode_methods(gm)
    return eval_mode(gm)
