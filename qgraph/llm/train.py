"""Train the stdlib Llama and keep its checkpoint: ``python -m qgraph.llm.train``.

The loops here are plain PyTorch and serve three users: fp32 pre-training of
:class:`~qgraph.models.llama.Llama` on the standard library's source
(:mod:`qgraph.models.pydata`), QAT fine-tuning of a prepared graph (an ``nn.Module`` like
any other), and the fp32 control run that QAT is compared with.

Optimizer: AdamW (β = 0.9, 0.95, weight decay 0.1 on matrices only), learning rate warmed up
linearly for ``warmup`` steps then cosine-decayed to ``min_lr_ratio · lr``; gradients
clipped at norm 1. Batches are random windows from a seeded generator, so a run is
deterministic for a given seed and thread count.

:func:`load_or_train` returns the checkpoint the tests and the table use,
``out/llama_stdlib.pt``: it trains (a few CPU minutes) when the file is missing or was
written for another model or training configuration, and writes it atomically.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qgraph.core.files import atomic_path
from qgraph.models import pydata
from qgraph.models.llama import Llama, LlamaConfig

CHECKPOINT = Path("out/llama_stdlib.pt")
EVAL_WINDOWS = 256
"""Held-out windows of ``max_seq_len`` bytes that define "held-out perplexity"."""


def stdlib_config() -> LlamaConfig:
    """The model of the checkpoint: 2 layers, width 128, 4 query / 2 kv heads, context 64
    (0.46 M parameters: small enough to train in a few CPU minutes, and small enough that
    int4 weights cost it measurable perplexity)."""
    return LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=384, max_seq_len=64)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio · lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def train(
    model: nn.Module,
    data: torch.Tensor,
    cfg: TrainConfig,
    seq_len: int,
    params: Iterable[nn.Parameter] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` (eager or a prepared GraphModule) in place; returns the loss per step.

    ``params`` restricts what is trained (default: every parameter that requires grad).
    """
    torch.manual_seed(cfg.seed)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    losses = []
    batches = pydata.train_batches(data, cfg.batch_size, seq_len, cfg.steps, seed=cfg.seed)
    for step, (x, y) in enumerate(tqdm(batches, total=cfg.steps, desc=desc, disable=not progress, leave=False)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 16
) -> float:
    """``exp(mean next-byte cross-entropy)`` over windows ``x`` (targets ``y``).

    ``logits_fn`` is any callable from int64 ``[b, T]`` to ``[b, T, vocab]``: an eager model,
    a converted graph, a ``.pte`` or ONNX session with a fixed batch (``len(x)`` must then be
    a multiple of ``batch_size``).
    """
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = logits_fn(x[i : i + batch_size])
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), y[i : i + batch_size].reshape(-1), reduction="sum"
        ).item()
        count += y[i : i + batch_size].numel()
    return math.exp(total / count)


def heldout_windows(seq_len: int, n: int = EVAL_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation windows of "held-out perplexity"."""
    return pydata.eval_windows(pydata.load_split("heldout"), n, seq_len)


def _eval_mode_model(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()
    return model


def train_fp32(
    model_cfg: LlamaConfig | None = None, train_cfg: TrainConfig | None = None, progress: bool = True
) -> tuple[Llama, dict]:
    """Train a fresh model; returns it and a record (losses, perplexity, seconds)."""
    model_cfg = model_cfg or stdlib_config()
    train_cfg = train_cfg or TrainConfig()
    torch.manual_seed(train_cfg.seed)
    model = Llama(model_cfg)
    start = time.perf_counter()
    losses = train(model, pydata.load_split("train"), train_cfg, model_cfg.max_seq_len, progress=progress, desc="fp32")
    seconds = time.perf_counter() - start
    x, y = heldout_windows(model_cfg.max_seq_len)
    ppl = perplexity(_eval_mode_model(model), x, y)
    record = {
        "config": model_cfg.to_dict(),
        "train": asdict(train_cfg),
        "heldout_ppl": ppl,
        "seconds": seconds,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "threads": torch.get_num_threads(),
    }
    return model, record


def save_checkpoint(model: Llama, record: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({**record, "state_dict": model.state_dict()}, tmp)


def load_checkpoint(path: str | Path) -> tuple[Llama, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = Llama(LlamaConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    record = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), record


def load_or_train(
    path: str | Path = CHECKPOINT,
    model_cfg: LlamaConfig | None = None,
    train_cfg: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[Llama, dict]:
    """The checkpoint at ``path``; trained and written (atomically) when missing or stale."""
    model_cfg = model_cfg or stdlib_config()
    train_cfg = train_cfg or TrainConfig()
    path = Path(path)
    if path.exists():
        model, record = load_checkpoint(path)
        if record.get("config") == model_cfg.to_dict() and record.get("train") == asdict(train_cfg):
            return model, record
    model, record = train_fp32(model_cfg, train_cfg, progress)
    save_checkpoint(model, record, path)
    return model.eval(), record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgraph.llm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(CHECKPOINT), help=f"checkpoint path (default: {CHECKPOINT})")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--force", action="store_true", help="train even if a matching checkpoint exists")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_cfg = TrainConfig(steps=args.steps)
    if args.force and Path(args.out).exists():
        Path(args.out).unlink()
    _, record = load_or_train(args.out, train_cfg=train_cfg)
    print(
        f"{args.out}: held-out perplexity {record['heldout_ppl']:.3f} "
        f"(final train loss {record['final_train_loss']:.3f}, {record['seconds']:.0f} s on {record['threads']} threads)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
