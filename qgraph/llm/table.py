"""The LLM acceptance table: ``python -m qgraph.llm.table`` prints it; ``--readme PATH``
also rewrites the section between the table markers of that file.

Starting from the fp32 checkpoint (:func:`qgraph.llm.train.load_or_train`), with the 8da4w
scheme (:func:`qgraph.int8_dynamic_int4_weight`, group size ``G``):

1. **fp32 fine-tuned** — the checkpoint trained ``N`` more steps in fp32: the baseline.
2. **PTQ 8da4w** — that baseline quantized without training (weights need no calibration
   data, activations are quantized per token at run time).
3. **QAT 8da4w** — the checkpoint trained the same ``N`` steps with the same data, learning
   rate and seed, but through fake quantization (int4 per-group weights, int8 per-token
   inputs, straight-through gradients), then converted.

This is the protocol of torchtune's QAT recipe (also behind torchao's "QAT recovers 68%
of the perplexity degradation"): PTQ and QAT get the same extra training, so the difference
is the fake quantization alone, and

    recovered = (ppl_PTQ − ppl_QAT) / (ppl_PTQ − ppl_fp32 fine-tuned)

is the share of what PTQ loses that QAT wins back. The QAT model is then written as a
``.pte`` (every linear in XNNPACK's dynamically quantized int4 kernel) and an ONNX model,
run in the ExecuTorch runtime and ONNX Runtime on the same held-out windows, and decoded
greedily for 64 bytes from a prompt by the ``.pte`` and by the converted graph.

Rows for QAT + LoRA (merged / unmerged) come from ``extra_rows`` callables; without them the
rows say "not measured". Everything is deterministic for a given checkpoint and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tabulate import tabulate

import qgraph
from qgraph.core.errors import ConfigError
from qgraph.core.files import atomic_write_text
from qgraph.llm.lora_rows import qat_lora_rows
from qgraph.llm.rows import LORA_ROWS, Row
from qgraph.llm.train import CHECKPOINT, TrainConfig, heldout_windows, load_or_train, perplexity, train
from qgraph.models import pydata
from qgraph.models.llama import greedy_decode
from qgraph.recipes.lowbit import llm_config

BEGIN, END = "<!-- llm-table:begin -->", "<!-- llm-table:end -->"
PROMPT = "class Queue:\n    def __init__(self"
DECODE_TOKENS = 64
EMBEDDING_BITS = 4
"""The embedding table is int4 weight-only in the same groups, as ExecuTorch's Llama export
does with ``-qmode 8da4w -E 4,<group>`` (in the ``.pte``: the ``embedding_4bit`` kernel)."""


def finetune_config(steps: int = 200) -> TrainConfig:
    """The extra training both the fp32 baseline and QAT get (same data, lr, seed).

    The learning rate is a fine-tuning one, 1/15 of the pre-training peak. The checkpoint is
    far from converged, so at higher rates the fine-tuning mostly keeps *learning*, which
    fake quantization slows down, and the comparison measures that instead of how well the
    weights adapt to the int4 grid (measured here: recovery 37% at 1e-3, 33% at 1e-3 for 400
    steps, 66-68% at 3e-4, 80% at 2e-4).
    """
    return TrainConfig(steps=steps, batch_size=16, lr=2e-4, warmup=10, min_lr_ratio=0.1, seed=1)


@dataclass
class LlmTable:
    group_size: int
    rows: list[Row] = field(default_factory=list)
    recovered: float = float("nan")
    pte_vs_converted: float = float("nan")
    """Relative difference of the ``.pte``'s perplexity from the converted graph's."""
    decode_match: bool = False
    decoded: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    delegated_linears: tuple[int, int] = (0, 0)
    seconds: dict[str, float] = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)

    def ppl(self, name: str) -> float:
        return next(r.ppl for r in self.rows if r.name == name)

    @property
    def size_ratio(self) -> float:
        return self.sizes["8da4w .pte"] / self.sizes["fp32 .pte"]

    def markdown(self) -> str:
        ckpt = self.checkpoint
        lines = [
            f"Held-out perplexity (bytes of {len(pydata.heldout_modules())} held-out stdlib modules, "
            f"{ckpt.get('eval_tokens', 0):,} predicted bytes); 8da4w = int8 per-token dynamic activations, "
            f"int4 symmetric weights in groups of {self.group_size} on every linear; the embedding table "
            f"int{EMBEDDING_BITS} weight-only in the same groups.",
            "",
        ]
        rows = [[r.name, "—" if r.ppl is None else f"{r.ppl:.3f}", r.note] for r in self.rows]
        lines.append(tabulate(rows, headers=["model", "perplexity", ""], tablefmt="github"))
        lines += [
            "",
            f"- QAT recovers **{100 * self.recovered:.0f}%** of the perplexity PTQ loses "
            f"(PTQ − QAT over PTQ − fp32 fine-tuned).",
            f"- `.pte` perplexity vs the converted graph: {100 * self.pte_vs_converted:+.3f}%; greedy decoding of "
            f"{DECODE_TOKENS} bytes gives {'the same' if self.decode_match else 'DIFFERENT'} tokens in both.",
            f"- `.pte` size: 8da4w {self.sizes['8da4w .pte'] / 1024:.0f} KiB = **{self.size_ratio:.3f}×** fp32 "
            f"({self.sizes['fp32 .pte'] / 1024:.0f} KiB); {self.delegated_linears[0]} of "
            f"{self.delegated_linears[1]} linears inside the XNNPACK delegate.",
            f"- Checkpoint: {ckpt.get('params', 0) / 1e6:.2f} M parameters, trained {ckpt.get('steps')} steps "
            f"in {ckpt.get('seconds', 0):.0f} s on {ckpt.get('threads')} threads. Timings of this run: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
            + ".",
            f"- Greedy continuation of `{PROMPT!r}` by the `.pte`: `{self.decoded.get('pte', '')!r}`",
        ]
        return "\n".join(lines)


def _timed(seconds: dict, name: str):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - self.start

    return _Timer()


def _linear_counts(report) -> tuple[int, int]:
    inside = sum(v for k, v in report.delegated.items() if "linear" in k)
    outside = sum(v for k, v in report.not_delegated.items() if "linear" in k)
    return inside, inside + outside


def run_table(
    out_dir: str | Path = "out",
    group_size: int = 128,
    finetune_steps: int = 200,
    checkpoint: str | Path = CHECKPOINT,
    extra_rows: tuple[Callable[[dict], list[Row]], ...] = (),
    progress: bool = True,
) -> LlmTable:
    """Measure every row; ``extra_rows`` callables get a context dict (base model, configs,
    eval windows, example input) and return rows that replace the placeholders."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = LlmTable(group_size=group_size)
    secs = result.seconds
    with _timed(secs, "checkpoint"):
        base, record = load_or_train(checkpoint, progress=progress)
    cfg = base.config
    x_eval, y_eval = heldout_windows(cfg.max_seq_len)
    example = x_eval[:2]  # capture at batch 2: batch 1 would specialize the batch dimension
    config = llm_config(group_size, embedding_bits=EMBEDDING_BITS)
    ft = finetune_config(finetune_steps)
    train_data = pydata.load_split("train")
    result.checkpoint = {
        "params": sum(p.numel() for p in base.parameters()),
        "steps": record["train"]["steps"],
        "seconds": record["seconds"],
        "threads": record["threads"],
        "eval_tokens": y_eval.numel(),
    }

    rows = [Row("fp32 checkpoint", perplexity(base, x_eval, y_eval), f"{record['train']['steps']} steps")]
    with _timed(secs, "fp32 fine-tune"):
        baseline = copy.deepcopy(base)
        train(baseline, train_data, ft, cfg.max_seq_len, progress=progress, desc="fp32 fine-tune")
    ppl_fp32 = perplexity(baseline, x_eval, y_eval)
    rows.append(Row("fp32 fine-tuned (baseline)", ppl_fp32, f"+{ft.steps} steps"))

    with _timed(secs, "PTQ"):
        ptq = qgraph.convert(qgraph.prepare_ptq(baseline, (example,), config=config))
    ppl_ptq = perplexity(ptq, x_eval, y_eval)
    rows.append(Row("PTQ 8da4w", ppl_ptq, "baseline, converted"))

    with _timed(secs, "QAT"):
        prepared = qgraph.prepare_qat(base, (example,), config=config)
        train(prepared, train_data, ft, cfg.max_seq_len, progress=progress, desc="QAT")
        qat = qgraph.convert(prepared)
    ppl_qat = perplexity(qat, x_eval, y_eval)
    rows.append(Row("QAT 8da4w", ppl_qat, f"+{ft.steps} steps, converted"))

    context = {
        "base": base, "baseline": baseline, "config": config, "finetune": ft, "windows": (x_eval, y_eval),
        "example": example, "train_data": train_data, "group_size": group_size, "out_dir": out,
    }
    extra = [r for make in extra_rows for r in make(context)]
    for name in LORA_ROWS:
        found = [r for r in extra if r.name == name]
        rows.extend(found or [Row(name, None, "not measured")])
    rows.extend(r for r in extra if r.name not in LORA_ROWS)

    with _timed(secs, ".pte export"):
        report = qgraph.export_pte(qat, (example[:1],), out / "llama_8da4w.pte")
        fp32_report = qgraph.export_pte(base, (example[:1],), out / "llama_fp32.pte")
    result.sizes = {"8da4w .pte": report.size_bytes, "fp32 .pte": fp32_report.size_bytes}
    result.delegated_linears = _linear_counts(report)
    run_pte = qgraph.load_pte(report.path)
    with _timed(secs, ".pte eval"):
        ppl_pte = perplexity(run_pte, x_eval, y_eval, batch_size=1)
    rows.append(Row("QAT 8da4w, .pte (ExecuTorch, XNNPACK)", ppl_pte, "same windows, batch 1"))

    with _timed(secs, "ONNX"):
        onnx_path = qgraph.export_onnx(qat, (example,), out / "llama_8da4w.onnx")
        ppl_onnx = perplexity(qgraph.load_onnx(onnx_path), x_eval, y_eval)
    rows.append(Row("QAT 8da4w, ONNX Runtime", ppl_onnx, "MatMulNBits, int8 blocks (accuracy level 4)"))

    prompt = pydata.encode(PROMPT)
    with _timed(secs, "decode"):
        by_pte = greedy_decode(run_pte, prompt, DECODE_TOKENS, cfg.max_seq_len)
        by_graph = greedy_decode(qat, prompt, DECODE_TOKENS, cfg.max_seq_len)
    result.decode_match = bool(torch.equal(by_pte, by_graph))
    result.decoded = {"pte": pydata.decode(by_pte), "converted": pydata.decode(by_graph)}

    result.rows = rows
    result.recovered = (ppl_ptq - ppl_qat) / (ppl_ptq - ppl_fp32)
    result.pte_vs_converted = ppl_pte / ppl_qat - 1.0
    return result


def write_readme(table: LlmTable, readme: str | Path) -> bool:
    """Replace the text between the table markers of ``readme``; False when there are none.

    The file is rewritten atomically; a missing file raises :class:`ConfigError`.
    """
    path = Path(readme)
    if not path.is_file():
        raise ConfigError(f"write_readme: {path} is not a file; give the README whose {BEGIN} section to rewrite")
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return False
    block = f"{BEGIN}\n{table.markdown()}\n{END}"
    atomic_write_text(path, re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgraph.llm.table", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--readme", default=None, metavar="PATH",
        help=f"also rewrite the {BEGIN} ... {END} section of this file (default: only print the table)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.readme is not None and not Path(args.readme).is_file():  # checked before an hour of training
        parser.error(f"--readme {args.readme}: no such file")
    torch.set_num_threads(args.threads)

    table = run_table(args.out, args.group_size, args.finetune_steps, extra_rows=(qat_lora_rows,))
    print(table.markdown())
    record = {**asdict(table), "rows": [asdict(r) for r in table.rows], "size_ratio": table.size_ratio}
    atomic_write_text(Path(args.out) / "llm_table.json", json.dumps(record, indent=2))
    if args.readme is not None and not write_readme(table, args.readme):
        print(f"(no {BEGIN} … {END} markers in {args.readme}; it was not changed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
