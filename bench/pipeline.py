"""Benchmark the QAT pipeline of qgraph against the oracle (torchao PT2E + XNNPACKQuantizer).

Models: torchvision ``resnet18`` and ``mobilenet_v2`` (random init, ``num_classes=10``,
224x224 inputs). Every flow starts from the same initial weights and trains on the same
fixed batches. Torch runs with ``torch.set_num_threads(2)``; ExecuTorch's XNNPACK
threadpool and ONNX Runtime use their defaults (one thread per core).

For each model the script measures:

* fp32 baseline (one line, ``"flow": "fp32"``): one eager training step (median), the
  size and batch-1 latency of an fp32 ``.pte`` (XNNPACK delegate) and the batch-1 latency
  of an fp32 ONNX model in ONNX Runtime.
* each quantized flow (one line each, ``"flow": "qgraph"`` / ``"torchao"``):

  - ``prepare_s``: wall time of preparing for QAT, *including* the ``torch.export``
    capture (qgraph's ``prepare_qat`` captures internally; for torchao the
    ``torch.export.export`` call is timed together with ``prepare_qat_pt2e``);
  - ``train_step_ratio``: median time of one QAT training step divided by the median time
    of one fp32 eager training step (batch 8, SGD, cross-entropy on random labels; one
    warm-up step, then the median of 3 steps);
  - ``convert_s``: wall time of ``qgraph.convert`` / ``convert_pt2e`` (after the prepared
    model is moved to eval mode, which is not timed);
  - ``pte_*``: size and batch-1 latency (median of 10 runs after 2 warm-ups) of the int8
    ``.pte`` and its delegation (fraction of ops inside XNNPACK, ops left outside);
  - ``onnx_*``: batch-1 latency of the QDQ ONNX model in ONNX Runtime (same protocol);
  - ``*_diff_steps``: max abs difference between a runtime's output and the converted
    GraphModule run in PyTorch on the same batch-1 input, divided by the output
    quantization scale (the scale of the graph's last dequantize node), i.e. in
    quantization steps. ``fakequant_diff_steps`` compares the prepared (fake-quant) model
    in eval mode with the converted one the same way.

A final ``"kind": "summary"`` line gives qgraph/torchao ratios of these numbers per model.
Every line also records ``load_avg`` (the 1-minute system load when it was written): the
timings are only meaningful when nothing else competes for the cores.

The torchao model is captured with a dynamic batch dimension (like qgraph's capture) so
that the model trained at batch 8 can be converted and served at batch 1; every training
step still uses batch 8.

Output: JSON lines on stdout, one object per line; progress and library noise go to
stderr. Usage::

    python bench/pipeline.py [--models resnet18,mobilenet_v2] [--quick] > bench.jsonl

``--quick`` takes one measurement per quantity instead of 3 (training) / 10 (latency).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torchvision
from torch import nn

import qgraph
from qgraph.backends.executorch_emitter import write_pte
from qgraph.backends.onnx_emitter import write_onnx

NUM_THREADS = 2
NUM_CLASSES = 10
RESOLUTION = 224
TRAIN_BATCH = 8
LEARNING_RATE = 1e-3
TRAIN_WARMUP = 1
LATENCY_WARMUP = 2
SEED = 0


@dataclass
class Reps:
    """How many timed repetitions each measurement takes."""

    train: int = 3
    latency: int = 10


# ----------------------------------------------------------------------------- output


def _json_stream():
    """A stream on the real stdout; fd 1 itself is pointed at stderr.

    Exporters and runtimes print progress (some from C++), so everything except the JSON
    lines goes to stderr.
    """
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return out


JSON_OUT = None


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), file=JSON_OUT, flush=True)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def load_average() -> float:
    """1-minute system load: other processes on the same cores make every timing noisy."""
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[1] for _ in range(reps))


def latency_ms(run: Callable[[torch.Tensor], Any], x: torch.Tensor, reps: int) -> float:
    return 1000.0 * median_seconds(lambda: run(x), LATENCY_WARMUP, reps)


def train_step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    """Median wall time of one SGD step (forward, cross-entropy, backward, update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return median_seconds(step, TRAIN_WARMUP, reps)


# ----------------------------------------------------------------------------- models & data


def build_model(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    return getattr(torchvision.models, name)(num_classes=NUM_CLASSES)


def make_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed training batch (images, labels) and a fixed batch-1 inference input."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(TRAIN_BATCH, 3, RESOLUTION, RESOLUTION, generator=g)
    y = torch.randint(0, NUM_CLASSES, (TRAIN_BATCH,), generator=g)
    x1 = torch.randn(1, 3, RESOLUTION, RESOLUTION, generator=g)
    return x, y, x1


# ----------------------------------------------------------------------------- accuracy


def output_scale(converted: torch.fx.GraphModule) -> float:
    """Scale of the dequantize node feeding the graph's first output."""
    output = next(n for n in converted.graph.nodes if n.op == "output")
    dequant = output.args[0][0]
    if "dequantize" not in str(dequant.target):
        raise RuntimeError(f"the first output is {dequant.target}, not a dequantize node")
    scale = dequant.args[1]
    if isinstance(scale, torch.fx.Node):  # a get_attr tensor rather than a literal
        scale = getattr(converted, scale.target)
    return float(scale)


def diff_steps(out: torch.Tensor, reference: torch.Tensor, scale: float) -> float:
    return float((out.float() - reference.float()).abs().max()) / scale


# ----------------------------------------------------------------------------- flows


@dataclass
class Flow:
    """One QAT implementation: capture+prepare, train/eval switches, convert, export."""

    name: str
    prepare: Callable[[nn.Module, torch.Tensor], torch.fx.GraphModule]
    to_train: Callable[[torch.fx.GraphModule], Any]
    to_eval: Callable[[torch.fx.GraphModule], Any]
    convert: Callable[[torch.fx.GraphModule], torch.fx.GraphModule]
    export_pte: Callable[[torch.fx.GraphModule, torch.Tensor, Path], Any]
    export_onnx: Callable[[torch.fx.GraphModule, torch.Tensor, Path], Any]


def qgraph_flow() -> Flow:
    return Flow(
        name="qgraph",
        prepare=lambda model, x: qgraph.prepare_qat(model, (x,)),
        to_train=lambda p: p.train(),
        to_eval=lambda p: p.eval(),
        convert=qgraph.convert,
        export_pte=lambda q, x, path: qgraph.export_pte(q, (x,), path),
        export_onnx=lambda q, x, path: qgraph.export_onnx(q, (x,), path),
    )


def torchao_flow() -> Flow:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    def prepare(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        gm = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
        config = get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
        return prepare_qat_pt2e(gm, XNNPACKQuantizer().set_global(config))

    return Flow(
        name="torchao",
        prepare=prepare,
        to_train=move_exported_model_to_train,
        to_eval=move_exported_model_to_eval,
        convert=convert_pt2e,
        export_pte=lambda q, x, path: write_pte(torch.export.export(q, (x,)), path),
        export_onnx=lambda q, x, path: write_onnx(q, (x,), None, path),
    )


# ----------------------------------------------------------------------------- measurements


def measure_fp32(name: str, model: nn.Module, data, workdir: Path, reps: Reps) -> dict[str, Any]:
    x, y, x1 = data
    log(f"{name}/fp32: eager training step")
    train_s = train_step_seconds(copy.deepcopy(model).train(), x, y, reps.train)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = model(x1)

    log(f"{name}/fp32: .pte")
    report, pte_export_s = timed(write_pte, torch.export.export(model, (x1,)), workdir / "fp32.pte")
    pte = qgraph.load_pte(report.path)
    log(f"{name}/fp32: .onnx")
    onnx_path, onnx_export_s = timed(write_onnx, model, (x1,), None, workdir / "fp32.onnx")
    ort = qgraph.load_onnx(onnx_path)
    return {
        "kind": "fp32",
        "model": name,
        "flow": "fp32",
        "train_step_s": train_s,
        "pte_export_s": pte_export_s,
        "pte_size_bytes": report.size_bytes,
        "pte_latency_ms": latency_ms(pte, x1, reps.latency),
        "pte_delegated_fraction": report.delegated_fraction,
        "pte_max_abs_diff": float((pte(x1) - reference).abs().max()),
        "onnx_export_s": onnx_export_s,
        "onnx_latency_ms": latency_ms(ort, x1, reps.latency),
        "onnx_max_abs_diff": float((ort(x1) - reference).abs().max()),
        "load_avg": load_average(),
    }


def measure_flow(
    flow: Flow, name: str, model: nn.Module, data, fp32_train_s: float, workdir: Path, reps: Reps
) -> dict[str, Any]:
    x, y, x1 = data
    tag = f"{name}/{flow.name}"

    log(f"{tag}: prepare_qat")
    prepared, prepare_s = timed(flow.prepare, copy.deepcopy(model), x)
    log(f"{tag}: QAT training steps")
    flow.to_train(prepared)
    qat_train_s = train_step_seconds(prepared, x, y, reps.train)

    flow.to_eval(prepared)
    log(f"{tag}: convert")
    converted, convert_s = timed(flow.convert, prepared)
    scale = output_scale(converted)
    with torch.no_grad():
        reference = converted(x1)
        fakequant = prepared(x1)

    log(f"{tag}: .pte")
    report, pte_export_s = timed(flow.export_pte, converted, x1, workdir / f"{flow.name}.pte")
    pte = qgraph.load_pte(report.path)
    log(f"{tag}: .onnx")
    onnx_path, onnx_export_s = timed(flow.export_onnx, converted, x1, workdir / f"{flow.name}.onnx")
    ort = qgraph.load_onnx(onnx_path)
    return {
        "kind": "quantized",
        "model": name,
        "flow": flow.name,
        "prepare_s": prepare_s,
        "convert_s": convert_s,
        "qat_train_step_s": qat_train_s,
        "train_step_ratio": qat_train_s / fp32_train_s,
        "output_scale": scale,
        "fakequant_diff_steps": diff_steps(fakequant, reference, scale),
        "pte_export_s": pte_export_s,
        "pte_size_bytes": report.size_bytes,
        "pte_latency_ms": latency_ms(pte, x1, reps.latency),
        "pte_diff_steps": diff_steps(pte(x1), reference, scale),
        "pte_delegated_fraction": report.delegated_fraction,
        "pte_not_delegated": dict(report.not_delegated),
        "onnx_export_s": onnx_export_s,
        "onnx_latency_ms": latency_ms(ort, x1, reps.latency),
        "onnx_diff_steps": diff_steps(ort(x1), reference, scale),
        "load_avg": load_average(),
    }


RATIO_FIELDS = (
    "prepare_s",
    "convert_s",
    "train_step_ratio",
    "pte_size_bytes",
    "pte_latency_ms",
    "onnx_latency_ms",
    "pte_diff_steps",
    "onnx_diff_steps",
)


def ratios(ours: dict[str, Any], oracle: dict[str, Any]) -> dict[str, float | None]:
    """``ours / oracle`` per field; ``None`` where the oracle's value is zero."""
    return {k: (ours[k] / oracle[k] if oracle[k] else None) for k in RATIO_FIELDS}


# ----------------------------------------------------------------------------- main


def benchmark_model(name: str, flows: list[Flow], reps: Reps) -> dict[str, dict[str, Any]]:
    model = build_model(name)
    data = make_inputs()
    results = {}
    with tempfile.TemporaryDirectory(prefix=f"qgraph-bench-{name}-") as tmp:
        workdir = Path(tmp)
        fp32 = measure_fp32(name, model, data, workdir, reps)
        emit(fp32)
        for flow in flows:
            record = measure_flow(flow, name, model, data, fp32["train_step_s"], workdir, reps)
            emit(record)
            results[flow.name] = record
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="comma-separated torchvision model names")
    parser.add_argument("--quick", action="store_true", help="one repetition per measurement (smoke test)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    global JSON_OUT
    args = parse_args(argv)
    JSON_OUT = _json_stream()
    warnings.simplefilter("ignore")
    torch.set_num_threads(NUM_THREADS)
    reps = Reps(train=1, latency=1) if args.quick else Reps()
    flows = [qgraph_flow(), torchao_flow()]

    if load_average() > 0.5:
        log(f"load average is {load_average()} before starting: timings will be noisy")
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results = benchmark_model(name, flows, reps)
        summary[name] = ratios(results["qgraph"], results["torchao"])
    emit(
        {
            "kind": "summary",
            "ratio": "qgraph/torchao",
            "models": summary,
            "quick": args.quick,
            "threads": NUM_THREADS,
            "total_s": time.perf_counter() - start,
        }
    )


if __name__ == "__main__":
    main()
