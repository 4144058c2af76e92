"""How the compile time of the QAT / PTQ pipeline grows with graph size, beside torchao's PT2E flow.

Model: :class:`qgraph.models.chain.ConvBnReluChain`, a stem conv and ``B`` conv-bn-relu blocks
at 4 channels on an 8x8 input (batch 2), so running it costs next to nothing and the time is
the compiler's. Its captured graph has ``10 B + 6`` nodes; the default ``--blocks
10,100,500,1000`` gives about 100, 1k, 5k and 10k nodes.

For each size and flow, one line per stage (``"kind": "stage"``) with its wall time
(``wall_s``), this process's CPU time (``cpu_s``; the steadier figure when other processes
share the machine), the part of that spent in Python's garbage collector (``gc_s``), and how
many cores other processes kept busy meanwhile (``other_cores``, from ``/proc/stat``;
absolute times mean something only near 0). Stages, in order:

* ``capture``: ``qgraph.capture`` (``torch.export`` with a dynamic batch) of the model in
  training mode; for torchao ``torch.export.export(...).module()`` with a dynamic batch;
* ``prepare_qat``: ``qgraph.prepare_qat(gm)`` (works on a copy of ``gm``) / ``prepare_qat_pt2e``;
* ``eval_mode``, ``train_mode``: the switches of the prepared model (qgraph also switches each
  simulated conv+BN between its train and eval form) / ``move_exported_model_to_eval`` / ``_train``;
* ``freeze_observers``, ``freeze_bn_stats``: after one training-mode forward (untimed) that
  gives the fake-quant modules their ranges; torchao's is ``apply(disable_observer)``, and
  PT2E has no BN freeze, so torchao has no ``freeze_bn_stats`` line;
* ``convert``: ``qgraph.convert`` / ``convert_pt2e`` of the model in eval mode (the switch
  is not timed);
* ``prepare_ptq``: ``qgraph.prepare_ptq(gm)`` of the same captured graph (qgraph only).

Then one ``"kind": "fit"`` line per flow and stage: ``seconds = fixed_s + per_node_ms ·
nodes / 1000`` by least squares over the sizes (wall and CPU time), and ``per_node_ratio``,
the cost per node (``seconds / nodes``) at the largest size over that at the size nearest
1,000 nodes: about 1 for a stage whose cost is linear with little fixed part, far above 1
for one that is quadratic. ``"stage": "prepare_qat+convert"`` sums the two.

torchao is timed at the two smallest sizes, then only while its ``prepare_qat`` + ``convert``
is estimated (from its fit at the sizes before) to take under ``--torchao-budget-s`` seconds;
the sizes past that get a ``"kind": "skip"`` line with the estimate.

Output: JSON lines on stdout; progress and library noise go to stderr. Usage::

    python bench/scaling.py [--blocks 10,100,500,1000] [--quick] > scaling.jsonl

``--quick`` runs 10 and 50 blocks (about 100 and 500 nodes), for smoke tests.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline  # noqa: E402
from pipeline import emit, log, redirect_noise_to_stderr, torchao_flow  # noqa: E402
from timing import OtherLoad  # noqa: E402

import qgraph  # noqa: E402
from qgraph.models.chain import ConvBnReluChain  # noqa: E402

BATCH = 2
RESOLUTION = 8
SEED = 0
NEAR = 1000  # the size per-node costs are compared against
TOTAL = "prepare_qat+convert"


# ----------------------------------------------------------------------------- measuring


class GcClock:
    """CPU seconds spent in the cyclic garbage collector while active (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            self.seconds += time.process_time() - self._start

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)


@dataclass
class Stage:
    wall_s: float
    cpu_s: float
    gc_s: float
    other_cores: float | None


def measure(fn: Callable[..., Any], *args: Any) -> tuple[Any, Stage]:
    """``fn(*args)`` and how long it took, after a full collection so that garbage left by the
    stage before is not charged to this one."""
    gc.collect()
    with OtherLoad() as load, GcClock() as gc_clock:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, Stage(wall, cpu, gc_clock.seconds, load.cores)


# ----------------------------------------------------------------------------- flows


def qgraph_stages(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, Stage], dict[str, int]]:
    stages: dict[str, Stage] = {}
    gm, stages["capture"] = measure(qgraph.capture, model, (x,))
    prepared, stages["prepare_qat"] = measure(qgraph.prepare_qat, gm, (x,))
    sizes = {"nodes": len(gm.graph.nodes), "prepared_nodes": len(prepared.graph.nodes)}
    _, stages["eval_mode"] = measure(qgraph.eval_mode, prepared)
    _, stages["train_mode"] = measure(qgraph.train_mode, prepared)
    prepared(x)  # fake-quant ranges and BN statistics before they are frozen
    _, stages["freeze_observers"] = measure(qgraph.freeze_observers, prepared)
    _, stages["freeze_bn_stats"] = measure(qgraph.freeze_bn_stats, prepared)
    qgraph.eval_mode(prepared)
    _, stages["convert"] = measure(qgraph.convert, prepared)
    _, stages["prepare_ptq"] = measure(qgraph.prepare_ptq, gm, (x,))
    return stages, sizes


def torchao_stages(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, Stage], dict[str, int]]:
    from torchao.quantization.pt2e.fake_quantize import disable_observer

    flow = torchao_flow()
    stages: dict[str, Stage] = {}
    gm, stages["capture"] = measure(flow.capture, model, x)
    nodes = len(gm.graph.nodes)
    prepared, stages["prepare_qat"] = measure(flow.prepare, gm, x)  # in place
    sizes = {"nodes": nodes, "prepared_nodes": len(prepared.graph.nodes)}
    _, stages["eval_mode"] = measure(flow.to_eval, prepared)
    _, stages["train_mode"] = measure(flow.to_train, prepared)
    prepared(x)
    _, stages["freeze_observers"] = measure(prepared.apply, disable_observer)
    flow.to_eval(prepared)
    _, stages["convert"] = measure(flow.convert, prepared)
    return stages, sizes


FLOWS = {"qgraph": qgraph_stages, "torchao": torchao_stages}


# ----------------------------------------------------------------------------- fitting


def linear_fit(nodes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares ``seconds = fixed + per_node · nodes``: ``(fixed, per_node)``."""
    n = len(nodes)
    mean_x, mean_y = sum(nodes) / n, sum(seconds) / n
    sxx = sum((x - mean_x) ** 2 for x in nodes)
    per_node = sum((x - mean_x) * (y - mean_y) for x, y in zip(nodes, seconds)) / sxx
    return mean_y - per_node * mean_x, per_node


def fit_record(flow: str, stage: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = [r["nodes"] for r in rows]
    record: dict[str, Any] = {"kind": "fit", "flow": flow, "stage": stage, "nodes": nodes}
    for clock in ("wall", "cpu"):
        seconds = [r[f"{clock}_s"] for r in rows]
        prefix = "" if clock == "wall" else "cpu_"
        fixed, per_node = linear_fit(nodes, seconds)
        record[f"{prefix}fixed_s"] = round(fixed, 4)
        record[f"{prefix}per_node_ms"] = round(1000 * per_node, 5)
        near = min(range(len(rows)), key=lambda i: abs(nodes[i] - NEAR))
        largest = max(range(len(rows)), key=lambda i: nodes[i])
        if largest != near:
            per = [s / n for s, n in zip(seconds, nodes)]
            record[f"{prefix}per_node_ratio"] = round(per[largest] / per[near], 3)
    record["other_cores_max"] = max((r["other_cores"] for r in rows if r["other_cores"] is not None), default=None)
    return record


def totals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``prepare_qat`` + ``convert`` per size, as one more stage."""
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_size.setdefault(r["nodes"], {})[r["stage"]] = r
    out = []
    for nodes, stages in sorted(by_size.items()):
        if "prepare_qat" in stages and "convert" in stages:
            a, b = stages["prepare_qat"], stages["convert"]
            cores = [c for c in (a["other_cores"], b["other_cores"]) if c is not None]
            out.append(
                {
                    "kind": "stage", "flow": a["flow"], "stage": TOTAL, "blocks": a["blocks"], "nodes": nodes,
                    "wall_s": round(a["wall_s"] + b["wall_s"], 4), "cpu_s": round(a["cpu_s"] + b["cpu_s"], 4),
                    "gc_s": round(a["gc_s"] + b["gc_s"], 4), "other_cores": max(cores) if cores else None,
                }
            )  # fmt: skip
    return out


def estimate_s(rows: list[dict[str, Any]], nodes: int) -> float | None:
    """``prepare_qat`` + ``convert`` at ``nodes`` from the fit of the sizes measured so far;
    None before two sizes (one size cannot tell a fixed cost from a per-node one)."""
    done = totals(rows)
    if len(done) < 2:
        return None
    fixed, per_node = linear_fit([r["nodes"] for r in done], [r["wall_s"] for r in done])
    return fixed + per_node * nodes


# ----------------------------------------------------------------------------- main


def run(blocks: list[int], flows: list[str], budget_s: float) -> None:
    rows: dict[str, list[dict[str, Any]]] = {flow: [] for flow in flows}
    skipped: set[str] = set()
    for b in blocks:
        torch.manual_seed(SEED)
        model = ConvBnReluChain(b).train()
        x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(SEED))
        for flow in flows:
            nodes = 10 * b + 6
            estimate = estimate_s(rows[flow], nodes) if flow != "qgraph" else None
            if flow in skipped or (estimate is not None and estimate > budget_s):
                if flow in skipped:
                    reason = "a smaller size was skipped"
                else:
                    reason = f"prepare_qat + convert estimated at {estimate:.0f} s from the smaller sizes, over --torchao-budget-s"
                skipped.add(flow)
                emit({"kind": "skip", "flow": flow, "blocks": b, "nodes": nodes, "reason": reason})
                continue
            log(f"{flow}: {b} blocks")
            stages, sizes = FLOWS[flow](copy.deepcopy(model), x)
            for stage, s in stages.items():
                row = {
                    "kind": "stage", "flow": flow, "stage": stage, "blocks": b, **sizes,
                    "wall_s": round(s.wall_s, 4), "cpu_s": round(s.cpu_s, 4), "gc_s": round(s.gc_s, 4),
                    "other_cores": s.other_cores,
                }  # fmt: skip
                rows[flow].append(row)
                emit(row)
            emit(totals([r for r in rows[flow] if r["blocks"] == b])[0])
            del stages
            gc.collect()
    for flow, flow_rows in rows.items():
        if len({r["nodes"] for r in flow_rows}) < 2:
            continue  # nothing to fit
        for stage in dict.fromkeys(r["stage"] for r in flow_rows):
            emit(fit_record(flow, stage, [r for r in flow_rows if r["stage"] == stage]))
        emit(fit_record(flow, TOTAL, totals(flow_rows)))
    emit(summary(rows))


def summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """qgraph's ``prepare_qat`` + ``convert`` at its largest size, and over torchao's at each shared size."""
    ours = {r["nodes"]: r for r in totals(rows.get("qgraph", []))}
    theirs = {r["nodes"]: r for r in totals(rows.get("torchao", []))}
    record: dict[str, Any] = {"kind": "summary", "stage": TOTAL}
    if ours:
        largest = ours[max(ours)]
        record.update(nodes=largest["nodes"], wall_s=largest["wall_s"], cpu_s=largest["cpu_s"],
                      other_cores=largest["other_cores"])  # fmt: skip
    record["vs_torchao_wall"] = {n: round(ours[n]["wall_s"] / theirs[n]["wall_s"], 4) for n in sorted(ours.keys() & theirs.keys())}
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="10,100,500,1000", help="conv-bn-relu blocks per size (10 nodes each)")
    parser.add_argument("--flows", default="qgraph,torchao")
    parser.add_argument("--torchao-budget-s", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10 and 50 blocks")
    args = parser.parse_args(argv)
    pipeline.JSON_OUT = redirect_noise_to_stderr()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    blocks = [10, 50] if args.quick else [int(b) for b in args.blocks.split(",")]
    run(sorted(blocks), args.flows.split(","), args.torchao_budget_s)


if __name__ == "__main__":
    main()
