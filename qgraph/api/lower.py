"""``qgraph.api.lower``: a converted model as integer reference ops with a runtime's rounding.

    q = qgraph.convert(prepared)
    ref = qgraph.lower(q, target="xnnpack")   # or "x86" / "onnxruntime"
    y = ref(x)                                # float in, float out, integers inside

Targets name where the model runs: ``"xnnpack"`` is ExecuTorch's XNNPACK delegate (the
``.pte`` of :func:`qgraph.export_pte`); ``"onnxruntime"`` is ONNX Runtime's CPU provider
(MLAS kernels, the ``.onnx`` of :func:`qgraph.export_onnx`); ``"x86"`` is the x86
backend's deployment target, which is ONNX Runtime, so it uses the same rules.
"""

from __future__ import annotations

import os

import torch.fx

from qgraph.api.modes import bind_mode_methods, eval_mode
from qgraph.core.errors import ConfigError
from qgraph.core.graph import copy_graph_module
from qgraph.core.meta import LOWERED_KEY
from qgraph.core.pass_manager import PassManager
from qgraph.passes.lower.lower_dynamic_reference import LowerDynamicReference
from qgraph.passes.lower.lower_reference import LowerReference

TARGETS = {"xnnpack": "xnnpack", "x86": "onnxruntime", "onnxruntime": "onnxruntime"}
"""Target name → whose integer arithmetic the reference ops reproduce."""



def default_target(quantized: torch.fx.GraphModule) -> str:
    """The target a converted model was quantized for: its backend's runtime."""
    backend = getattr(quantized, "meta", {}).get("qgraph_converted", {}).get("backend", "xnnpack")
    return "x86" if backend == "x86" else "xnnpack"


def lower(
    quantized: torch.fx.GraphModule,
    target: str | None = None,
    dump_dir: str | os.PathLike | None = None,
) -> torch.fx.GraphModule:
    """Rewrite every ``dq → op → q`` pattern of ``quantized`` into one ``qgraph_ref`` integer op.

    ``target`` picks the rounding rules (see :mod:`qgraph.ops.reference`); by default the
    runtime of the backend the model was quantized for. ``quantized`` is not changed.
    Dynamically quantized layers become :mod:`qgraph.ops.reference_dynamic` kernels (float out).
    Patterns without an integer kernel stay in Q/DQ form, so the result always runs.
    """
    if not isinstance(quantized, torch.fx.GraphModule) or "qgraph_converted" not in quantized.meta:
        raise ConfigError("lower() takes the model returned by qgraph.convert")
    target = default_target(quantized) if target is None else target
    if target not in TARGETS:
        raise ConfigError(f"lower(target={target!r}): choose one of {sorted(TARGETS)}")
    gm = copy_graph_module(quantized)
    runtime = TARGETS[target]
    gm = PassManager([LowerReference(runtime), LowerDynamicReference(runtime)], dump_dir=dump_dir, stage="lower")(gm)
    gm.meta[LOWERED_KEY] = {"target": target, "runtime": TARGETS[target]}
    bind_mode_methods(gm)
    return eval_mode(gm)
