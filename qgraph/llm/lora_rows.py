"""QAT + LoRA rows of the LLM table: 8da4w base, float adapters, merged and unmerged.

From the fp32 checkpoint (the same start as the QAT row): ``prepare_qat`` with the table's
8da4w config, :func:`qgraph.recipes.lora.add_lora` on every linear inside the decoder blocks (rank
``r``, ``alpha``), then the QAT row's training schedule (same steps, data and seed) on the
adapters alone — the int4 base weights stay frozen under fake quantization. Two converted
models come out of one training run:

* **unmerged** — ``convert(tuned)``: integer base linears, the adapters a float path beside
  them; computes exactly what training saw (``Q(W)x + s·B(Ax)``);
* **merged** — ``convert(merge_lora(tuned))``: ``W + s·B·A`` re-observed and quantized to
  int4, i.e. ``Q(W + s·BA)x``; free at inference, but only the part of the update that moves
  weights across int4 rounding steps survives.

Both are written as ``.pte`` (sizes in the notes) and checked against their converted
graphs on a few held-out windows. A third row trains the adapters through the merged
weight's quantizer (``add_lora(..., fake_quant_merged=True)``: ``fq(W + s·BA)``), so the
merged model is exactly what training saw.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import qgraph
from qgraph.llm.rows import LORA_ROWS, Row
from qgraph.llm.train import TrainConfig, perplexity, train
from qgraph.recipes.lora import add_lora, lora_parameters, merge_lora

TARGETS = r"layers\.\d+"
"""Every linear of every decoder block (wq, wk, wv, wo, w1, w2, w3); not the output head."""


MERGE_AWARE_ROW = "QAT + LoRA 8da4w, trained merged"


def _tune(context: dict, cfg: TrainConfig, r: int, alpha: float, fake_quant_merged: bool, progress: bool):
    """prepare_qat → add_lora → train the adapters; returns the tuned graph and a record."""
    base, config = context["base"], context["config"]
    x_eval = context["windows"][0]
    start = time.perf_counter()
    # Capture with batch 2: torch.export specializes a batch of 1, and training uses 16.
    prepared = qgraph.prepare_qat(base, (x_eval[:2],), config=config)
    tuned = add_lora(prepared, r=r, alpha=alpha, targets=TARGETS, fake_quant_merged=fake_quant_merged)
    params = lora_parameters(tuned)
    seconds = {"prepare + add_lora": time.perf_counter() - start}
    start = time.perf_counter()
    losses = train(tuned, context["train_data"], cfg, base.config.max_seq_len, params=params,
                   progress=progress, desc="QAT+LoRA (trained merged)" if fake_quant_merged else "QAT+LoRA")
    seconds["train"] = time.perf_counter() - start
    record = {"seconds": seconds, "trainable": sum(p.numel() for p in params),
              "total": sum(p.numel() for p in tuned.parameters()),
              "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}
    return tuned, record


LORA_LR = 1e-3
"""Adapters' learning rate: 5× the full fine-tune's. The adapters start at zero (``B = 0``)
and hold ~2 % of the parameters, so LoRA recipes train them at several times the rate of a
full fine-tune (QLoRA: 2e-4 against 2e-5); at the full fine-tune's 2e-4 they barely move
from zero in 200 steps."""


def qat_lora_rows(context: dict, r: int = 8, alpha: float = 16.0, lr: float | None = LORA_LR,
                  export: bool = True, merge_aware: bool = True, progress: bool = True) -> list[Row]:
    """The LoRA rows; ``context`` is the dict :func:`qgraph.llm.table.run_table` passes.

    ``lr=None`` takes the QAT row's learning rate. ``merge_aware`` adds a third row from a
    second run with ``fake_quant_merged=True`` (training through ``fq(W + s·BA)``, then
    merged). Timings and sizes go into ``context["lora"]`` for the caller's report.
    """
    x_eval, y_eval = context["windows"]
    example = x_eval[:1]  # the .pte runs one window at a time, as the table's .pte row does
    cfg: TrainConfig = context["finetune"] if lr is None else replace(context["finetune"], lr=lr)
    tuned, info = _tune(context, cfg, r, alpha, False, progress)
    seconds = info["seconds"]
    info.update(fake_quant_ppl=perplexity(tuned, x_eval, y_eval), lr=cfg.lr, r=r, alpha=alpha)

    start = time.perf_counter()
    unmerged = qgraph.convert(tuned)
    seconds["convert unmerged"] = time.perf_counter() - start
    start = time.perf_counter()
    merged = qgraph.convert(merge_lora(tuned))
    seconds["merge + convert"] = time.perf_counter() - start
    ppl_unmerged = perplexity(unmerged, x_eval, y_eval)
    ppl_merged = perplexity(merged, x_eval, y_eval)

    notes = {"unmerged": "", "merged": ""}
    if export:
        out = Path(context["out_dir"])
        for name, model in (("unmerged", unmerged), ("merged", merged)):
            start = time.perf_counter()
            report = qgraph.export_pte(model, (example,), out / f"llama_8da4w_lora_{name}.pte")
            seconds[f".pte {name}"] = time.perf_counter() - start
            info[f"{name} .pte bytes"] = report.size_bytes
            notes[name] = f", .pte {report.size_bytes / 1024:.0f} KiB"
            run = qgraph.load_pte(report.path)
            worst = max((run(x_eval[i : i + 1]) - model(x_eval[i : i + 1])).abs().max().item() for i in range(4))
            info[f"{name} .pte max |Δlogit| (4 windows)"] = worst
    trainable, total = info["trainable"], info["total"]
    what = f"r={r}, α={alpha:g}, {trainable / 1e3:.0f} k trainable ({100 * trainable / total:.1f}%), +{cfg.steps} steps at lr {cfg.lr:g}"
    rows = [
        Row(LORA_ROWS[0], ppl_merged, f"{what}; W + (α/r)·BA re-quantized to int4{notes['merged']}"),
        Row(LORA_ROWS[1], ppl_unmerged, f"{what}; float adapters beside int4 linears{notes['unmerged']}"),
    ]
    if merge_aware:
        tuned, aware = _tune(context, cfg, r, alpha, True, progress)
        start = time.perf_counter()
        merged = qgraph.convert(merge_lora(tuned))
        aware["seconds"]["merge + convert"] = time.perf_counter() - start
        aware["fake_quant_ppl"] = perplexity(tuned, x_eval, y_eval)
        info["trained merged"] = aware
        rows.append(Row(MERGE_AWARE_ROW, perplexity(merged, x_eval, y_eval),
                        f"{what}; trained through fq(W + (α/r)·BA) (fake_quant_merged=True), merged"))
    context["lora"] = info
    return rows
