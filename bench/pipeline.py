"""Benchmark the QAT pipeline of qgraph against the oracle (torchao PT2E + XNNPACKQuantizer).

Models: torchvision ``resnet18`` and ``mobilenet_v2`` (random init, ``num_classes=10``,
224x224 inputs). Every flow starts from the same initial weights and trains on the same
fixed batch. Torch runs with ``torch.set_num_threads(2)``; ExecuTorch's XNNPACK
threadpool and ONNX Runtime use their defaults (one thread per core).

For each model the script prints one line per flow:

* ``"flow": "fp32"``: one eager training step, and the size and batch-1 latency of an fp32
  ``.pte`` (XNNPACK delegate) and of an fp32 ONNX model in ONNX Runtime;
* ``"flow": "qgraph"`` and ``"flow": "torchao"``:

  - ``capture_s``: wall time of the ``torch.export`` capture (``qgraph.capture``; for
    torchao ``torch.export.export(...).module()``, both with a dynamic batch);
  - ``prepare_graph_s``: wall time of preparing the captured graph for QAT
    (``qgraph.prepare_qat(gm)``, which works on a private copy, vs ``prepare_qat_pt2e(gm)``,
    which rewrites ``gm`` in place); ``prepare_s`` = ``capture_s + prepare_graph_s``, what a
    user waits for from an ``nn.Module``;
  - ``train_step_ratio``: time of one QAT training step divided by the time of one fp32
    eager training step (batch 8, SGD, cross-entropy on random labels);
  - ``convert_s``: wall time of ``qgraph.convert`` / ``convert_pt2e`` (after the prepared
    model is moved to eval mode, which is not timed);
  - ``pte_*``: size and batch-1 latency of the int8 ``.pte``, and its delegation (fraction
    of ops inside XNNPACK, ops left outside);
  - ``onnx_*``: batch-1 latency of the QDQ ONNX model in ONNX Runtime;
  - ``*_diff_steps``: max abs difference between a runtime's output and the converted
    GraphModule run in PyTorch on the same batch-1 input, divided by the output
    quantization scale (the scale of the graph's last dequantize node), i.e. in
    quantization steps. ``fakequant_diff_steps`` compares the prepared (fake-quant) model
    in eval mode with the converted one the same way.

A final ``"kind": "summary"`` line gives qgraph/torchao ratios of these numbers per model,
and for the runtime latencies the paired ratio (``pte_latency_vs_torchao``,
``onnx_latency_vs_torchao``): the median of the per-round ratios, its 95 % interval and a
verdict, ``faster`` or ``slower`` only when the interval excludes 1, else ``tie``.

Timing protocol: training steps take 1 warm-up step, then the median of 3; runtime
latencies take 2 warm-up runs, then 30 rounds, each round one untimed run of each
runtime (steady state: its weights in cache, not the previous model's) followed by 5
timed ones, whose median is the round's time; ``*_latency_ms`` is the median over rounds.
The paired ratios to torchao come from 200 more rounds of the two flows alone. Each
runtime file is loaded 8 times and the rounds take turns among the loads, since one load
can stay about 1 % faster or slower than another of the same file.
The timings that are compared (fp32 / qgraph / torchao training steps; the three
``.pte``; the three ``.onnx``) are interleaved round-robin, so a change in machine load
hits all flows alike and cancels in a round's ratio; ``.pte`` and ``.onnx`` are timed
apart, since ONNX Runtime's worker threads keep spinning for a while after each run.
Each line records how many cores other processes kept busy meanwhile
(``other_cores_train``, ``other_cores_latency``; from ``/proc/stat``): absolute numbers
only mean something when these are near 0.

The torchao model is captured with a dynamic batch dimension (as qgraph's capture does)
so that the model trained at batch 8 can be converted and served at batch 1; every
training step still uses batch 8.

Output: JSON lines on stdout, one object per line; progress and library noise go to
stderr. Usage::

    python bench/pipeline.py [--models resnet18,mobilenet_v2] [--quick] > bench.jsonl

``--quick`` times each training step once and each runtime in 6 rounds of one run (the
fewest that bound a median; 6 paired rounds too), for smoke tests.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torchvision
from torch import nn

import qgraph
from qgraph.backends.executorch.emitter import write_pte
from qgraph.backends.onnx.emitter import write_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import OtherLoad, interleaved_medians, interleaved_rounds, loaded, paired_ratio, timed  # noqa: E402

NUM_THREADS = 2
NUM_CLASSES = 10
RESOLUTION = 224
TRAIN_BATCH = 8
LEARNING_RATE = 1e-3
TRAIN_WARMUP = 1
LATENCY_WARMUP = 2
SEED = 0
ORACLE = "torchao"


@dataclass
class Reps:
    """How many timed repetitions each measurement takes."""

    train: int = 3
    latency: int = 30  # rounds; each times ``latency_block`` runs of every runtime in a row
    latency_block: int = 5
    pair: int = 200  # rounds of a quantized flow against the oracle alone
    instances: int = 8  # loads of each runtime file, taking turns round by round


# ----------------------------------------------------------------------------- output

JSON_OUT = sys.stdout


def redirect_noise_to_stderr():
    """A stream on the real stdout for the JSON lines; fd 1 itself then points at stderr.

    Exporters and runtimes print progress (some from C++), so everything else goes to
    stderr.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return out


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), file=JSON_OUT, flush=True)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- training


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step of ``model``: forward, cross-entropy, backward, SGD update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


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


def max_abs_diff(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).abs().max())


# ----------------------------------------------------------------------------- flows


@dataclass
class Flow:
    """One QAT implementation: capture+prepare, train/eval switches, convert, export."""

    name: str
    capture: Callable[[nn.Module, torch.Tensor], nn.Module]
    prepare: Callable[[nn.Module, torch.Tensor], torch.fx.GraphModule]
    to_train: Callable[[torch.fx.GraphModule], Any]
    to_eval: Callable[[torch.fx.GraphModule], Any]
    convert: Callable[[torch.fx.GraphModule], torch.fx.GraphModule]
    export_pte: Callable[[torch.fx.GraphModule, torch.Tensor, Path], Any]
    export_onnx: Callable[[torch.fx.GraphModule, torch.Tensor, Path], Any]


def qgraph_flow() -> Flow:
    return Flow(
        name="qgraph",
        capture=lambda model, x: qgraph.capture(model, (x,)),
        prepare=lambda gm, x: qgraph.prepare_qat(gm, (x,)),
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

    def capture(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()

    def prepare(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.fx.GraphModule:
        config = get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
        return prepare_qat_pt2e(gm, XNNPACKQuantizer().set_global(config))

    return Flow(
        name="torchao",
        capture=capture,
        prepare=prepare,
        to_train=move_exported_model_to_train,
        to_eval=move_exported_model_to_eval,
        convert=convert_pt2e,
        export_pte=lambda q, x, path: write_pte(torch.export.export(q, (x,)), path),
        export_onnx=lambda q, x, path: write_onnx(q, (x,), None, path),
    )


def fp32_flow() -> Flow:
    """The float model itself: no prepare/convert; exported like torchao's model."""
    return Flow(
        name="fp32",
        capture=lambda model, x: model,
        prepare=lambda model, x: model,
        to_train=lambda m: m.train(),
        to_eval=lambda m: m.eval(),
        convert=lambda m: m,
        export_pte=lambda m, x, path: write_pte(torch.export.export(m, (x,)), path),
        export_onnx=lambda m, x, path: write_onnx(m, (x,), None, path),
    )


# ----------------------------------------------------------------------------- one model


@dataclass
class Run:
    """One flow on one model: its models, runtimes and the record it will print."""

    flow: Flow
    record: dict[str, Any]
    prepared: nn.Module | None = None
    converted: nn.Module | None = None
    pte: Callable[[torch.Tensor], torch.Tensor] | None = None
    onnx: Callable[[torch.Tensor], torch.Tensor] | None = None
    files: dict[str, Path] = field(default_factory=dict)  # "pte", "onnx"

    @property
    def quantized(self) -> bool:
        return self.flow.name != "fp32"


def prepare(run: Run, model: nn.Module, x: torch.Tensor) -> None:
    log(f"{run.record['model']}/{run.flow.name}: prepare")
    captured, capture_s = timed(run.flow.capture, copy.deepcopy(model), x)
    run.prepared, prepare_s = timed(run.flow.prepare, captured, x)
    if run.quantized:
        run.record.update(capture_s=capture_s, prepare_graph_s=prepare_s, prepare_s=capture_s + prepare_s)
    run.flow.to_train(run.prepared)


def time_training(runs: list[Run], x: torch.Tensor, y: torch.Tensor, reps: Reps) -> None:
    log(f"{runs[0].record['model']}: training steps ({', '.join(r.flow.name for r in runs)})")
    steps = {r.flow.name: sgd_step(r.prepared, x, y) for r in runs}
    seconds = interleaved_medians(steps, TRAIN_WARMUP, reps.train)
    for r in runs:
        r.record["train_step_s"] = seconds[r.flow.name]
        if r.quantized:
            r.record["train_step_ratio"] = seconds[r.flow.name] / seconds["fp32"]


def convert(run: Run) -> None:
    log(f"{run.record['model']}/{run.flow.name}: convert")
    run.flow.to_eval(run.prepared)
    run.converted, seconds = timed(run.flow.convert, run.prepared)
    if run.quantized:
        run.record["convert_s"] = seconds


LOADERS: dict[str, Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]] = {
    "pte": qgraph.load_pte,
    "onnx": lambda path: qgraph.load_onnx(path, spin=False),
}


def export(run: Run, x1: torch.Tensor, workdir: Path) -> None:
    name = run.flow.name
    log(f"{run.record['model']}/{name}: .pte")
    report, run.record["pte_export_s"] = timed(run.flow.export_pte, run.converted, x1, workdir / f"{name}.pte")
    run.record["pte_size_bytes"] = report.size_bytes
    run.record["pte_delegated_fraction"] = report.delegated_fraction
    run.record["pte_not_delegated"] = dict(report.not_delegated)
    run.files["pte"] = Path(report.path)
    run.pte = LOADERS["pte"](run.files["pte"])
    log(f"{run.record['model']}/{name}: .onnx")
    path, run.record["onnx_export_s"] = timed(run.flow.export_onnx, run.converted, x1, workdir / f"{name}.onnx")
    run.files["onnx"] = Path(path)
    run.onnx = LOADERS["onnx"](run.files["onnx"])


def time_latency(runs: list[Run], x1: torch.Tensor, reps: Reps) -> None:
    """Batch-1 latency of every flow's ``.pte``, then of every flow's ``.onnx``.

    Each quantized flow's latency is also given as a paired ratio to the oracle's (median
    of the per-round ratios, with its 95 % interval and verdict; see ``timing.paired_ratio``),
    from ``reps.pair`` further rounds of just the two, back to back: the fp32 runtime
    between them made the interval of 30 three-way rounds ±2 % wide on mobilenet_v2.
    Every runtime is loaded ``reps.instances`` times and the rounds take turns among the
    loads (see ``timing.interleaved_rounds``: one load can stay 1 % off another).
    Each runtime kind is timed round-robin on its own: ONNX Runtime's worker threads keep
    spinning for a while after a run, and a ``.pte`` timed right after one shares the
    cores with them (measured: mobilenet_v2's int8 ``.pte`` took 5.5 ms timed between
    ONNX Runtime runs, 2.4 ms timed on its own).
    """
    log(f"{runs[0].record['model']}: batch-1 latency of {2 * len(runs)} runtimes")
    for kind in ("pte", "onnx"):
        fns = {r.flow.name: loaded(functools.partial(LOADERS[kind], r.files[kind]), reps.instances, x1) for r in runs}
        rounds = interleaved_rounds(fns, LATENCY_WARMUP, reps.latency, settle=1, block=reps.latency_block)
        for r in runs:
            r.record[f"{kind}_latency_ms"] = 1000.0 * statistics.median(rounds[r.flow.name])
        for r in runs:
            if r.quantized and r.flow.name != ORACLE:
                pair = interleaved_rounds({n: fns[n] for n in (r.flow.name, ORACLE)}, 0, reps.pair, 1, reps.latency_block)
                r.record[f"{kind}_latency_vs_{ORACLE}"] = paired_ratio(pair[r.flow.name], pair[ORACLE])


def check_outputs(run: Run, x1: torch.Tensor) -> None:
    """Runtime outputs against the converted GraphModule; in output steps when quantized."""
    with torch.no_grad():
        reference = run.converted(x1)
        outputs = {"pte": run.pte(x1), "onnx": run.onnx(x1)}
        if run.quantized:
            outputs["fakequant"] = run.prepared(x1)
    if not run.quantized:
        for key, out in outputs.items():
            run.record[f"{key}_max_abs_diff"] = max_abs_diff(out, reference)
        return
    scale = output_scale(run.converted)
    run.record["output_scale"] = scale
    for key, out in outputs.items():
        run.record[f"{key}_diff_steps"] = max_abs_diff(out, reference) / scale


def benchmark_model(name: str, flows: list[Flow], reps: Reps) -> dict[str, dict[str, Any]]:
    """Run every flow on ``name``, print one line per flow, return the records by flow."""
    model = build_model(name)
    x, y, x1 = make_inputs()
    runs = [Run(f, {"kind": "fp32" if f.name == "fp32" else "quantized", "model": name, "flow": f.name}) for f in flows]
    with tempfile.TemporaryDirectory(prefix=f"qgraph-bench-{name}-") as tmp:
        for run in runs:
            prepare(run, model, x)
        with OtherLoad() as train_load:
            time_training(runs, x, y, reps)
        for run in runs:
            convert(run)
            export(run, x1, Path(tmp))
        with OtherLoad() as latency_load:
            time_latency(runs, x1, reps)
        for run in runs:
            check_outputs(run, x1)
            run.record["other_cores_train"] = train_load.cores
            run.record["other_cores_latency"] = latency_load.cores
            emit(run.record)
    return {run.flow.name: run.record for run in runs}


# ----------------------------------------------------------------------------- summary & main

RATIO_FIELDS = (
    "prepare_s",
    "prepare_graph_s",
    "convert_s",
    "train_step_ratio",
    "pte_size_bytes",
    "pte_latency_ms",
    "onnx_latency_ms",
    "pte_diff_steps",
    "onnx_diff_steps",
)


PAIRED_FIELDS = (f"pte_latency_vs_{ORACLE}", f"onnx_latency_vs_{ORACLE}")


def ratios(ours: dict[str, Any], oracle: dict[str, Any]) -> dict[str, float | None]:
    """``ours / oracle`` per field; ``None`` where the oracle's value is zero."""
    return {k: (ours[k] / oracle[k] if oracle[k] else None) for k in RATIO_FIELDS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="comma-separated torchvision model names")
    parser.add_argument("--quick", action="store_true", help="time training once and runtimes in 6 rounds of one run (smoke test)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    global JSON_OUT
    args = parse_args(argv)
    JSON_OUT = redirect_noise_to_stderr()
    warnings.simplefilter("ignore")
    torch.set_num_threads(NUM_THREADS)
    reps = Reps(train=1, latency=6, latency_block=1, pair=6, instances=1) if args.quick else Reps()
    flows = [fp32_flow(), qgraph_flow(), torchao_flow()]
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    with OtherLoad() as load:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            records = benchmark_model(name, flows, reps)
            summary[name] = ratios(records["qgraph"], records[ORACLE])
            summary[name].update({k: records["qgraph"][k] for k in PAIRED_FIELDS})
    if load.cores is not None and load.cores > 0.2:
        log(f"other processes kept {load.cores} cores busy on average: timings are noisy")
    emit(
        {
            "kind": "summary",
            "ratio": "qgraph/torchao",
            "models": summary,
            "quick": args.quick,
            "threads": NUM_THREADS,
            "total_s": time.perf_counter() - start,
            "other_cores": load.cores,
        }
    )


if __name__ == "__main__":
    main()
