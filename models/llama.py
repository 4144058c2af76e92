"""A small Llama-style decoder in plain PyTorch: RMSNorm, rotary embeddings, GQA, SwiGLU.

The architecture of Llama 2/3 at toy scale, written so that ``torch.export`` captures it
with a dynamic batch and a fixed context length (no kv cache: every call sees the whole
window, which is what training, perplexity and a simple greedy decoder need):

* **RMSNorm** — ``y = x / sqrt(mean(x²) + eps) · g``: no mean subtraction, no bias.
* **Rotary position embeddings** (RoPE) — query and key vectors are rotated pairwise by an
  angle ``pos · θ_i`` with ``θ_i = base^(-2i/d)``, so ``q·k`` depends on positions only through
  their difference. Written in the "rotate half" form of Hugging Face's Llama
  (``x·cos + rotate_half(x)·sin``), real arithmetic only, so every exporter can take it.
* **Grouped-query attention** — ``n_heads`` query heads share ``n_kv_heads`` key/value heads
  (each kv head serves ``n_heads / n_kv_heads`` query heads), which shrinks k/v projections.
* **SwiGLU** feed-forward — ``w2(silu(w1 x) ⊙ w3 x)``.
* pre-norm residual blocks, a final RMSNorm and an untied output projection.

Attention is written out (``softmax(q kᵀ/√d + causal mask) v``) instead of calling
``scaled_dot_product_attention`` so that the exported graph holds only ops every backend
knows. Causality means the logits at position ``t`` depend on tokens ``≤ t`` only, so a
prompt shorter than the context can be right-padded (see :func:`greedy_decode`).

This module imports torch only (``qgraph.models`` must not depend on qgraph).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of a :class:`Llama`. ``ffn_hidden`` is the inner width of the SwiGLU block."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 384
    max_seq_len: int = 128
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def tiny_config() -> LlamaConfig:
    """A 2-layer model for fast unit tests (every width a multiple of 64)."""
    return LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[max_seq_len, head_dim]`` (each angle repeated for both halves)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # each kv head serves `rep` query heads
            k = k[:, :, None].expand(b, self.n_kv_heads, rep, t, self.head_dim).reshape(b, self.n_heads, t, self.head_dim)
            v = v[:, :, None].expand(b, self.n_kv_heads, rep, t, self.head_dim).reshape(b, self.n_heads, t, self.head_dim)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """``forward(tokens int64 [B, T]) -> logits float [B, T, vocab]`` with ``T ≤ max_seq_len``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.full((cfg.max_seq_len, cfg.max_seq_len), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], self.causal_mask[:t, :t]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.output(self.norm(x))


@torch.no_grad()
def greedy_decode(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, new_tokens: int, context: int
) -> torch.Tensor:
    """Greedy decoding with a fixed-length window and no kv cache.

    ``logits_fn`` maps int64 ``[1, context]`` to ``[1, context, vocab]`` (an eager model, a
    converted graph or a ``.pte``: all take the same fixed shape). The prompt sits left-aligned
    in the window, padded with zeros on the right; causal attention makes the logits at the
    last real position independent of the padding. When the window is full it slides left.
    Returns the ``new_tokens`` generated token ids (int64 ``[new_tokens]``).
    """
    seq = [int(t) for t in prompt.reshape(-1)]
    out = []
    for _ in range(new_tokens):
        window = seq[-context:]
        x = torch.zeros(1, context, dtype=torch.int64)
        x[0, : len(window)] = torch.tensor(window, dtype=torch.int64)
        logits = logits_fn(x)
        nxt = int(logits[0, len(window) - 1].argmax())
        seq.append(nxt)
        out.append(nxt)
    return torch.tensor(out, dtype=torch.int64)
