"""A byte-level language-model data set: the Python standard library's own source code.

Real text that ships with every interpreter, so nothing is downloaded. The corpus is the
``.py`` files under ``sysconfig.get_paths()["stdlib"]``, without installed packages
(``site-packages``, ``dist-packages``), the regression-test suites (``test``, ``tests``,
``idle_test``) and ``pydoc_data`` (a generated blob of documentation strings). Each file
becomes its UTF-8 bytes followed by a ``0`` byte (never found in source code, so it acts as
a document separator); a token is one byte, so the vocabulary is 256.

The split is by module: a file is held out for evaluation when the SHA-256 of its path
relative to the stdlib root ends in a byte ``< HELDOUT_PERMILLE·256/1000`` (about 10% of the
files). It depends only on the path, so it is the same on every machine and does not move
when files are added. Files are concatenated in sorted path order.

* :func:`train_batches` — random windows ``(x, y)`` with ``y`` the next byte, from a seeded
  generator (deterministic given the seed).
* :func:`eval_windows` — a fixed set of evenly spaced windows of the held-out text: the
  perplexity benchmark.

This module imports torch only (``qgraph.models`` must not depend on qgraph).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"})
HELDOUT_PERMILLE = 100
SEPARATOR = 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Relative paths of the corpus files, sorted."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages is large
        for name in filenames:
            if name.endswith(".py"):
                files.append((Path(dirpath) / name).relative_to(root))
    return sorted(files)


def is_heldout(rel: Path) -> bool:
    """Whether the module at ``rel`` belongs to the evaluation split (hash of the path)."""
    digest = hashlib.sha256(rel.as_posix().encode()).digest()
    return digest[-1] < HELDOUT_PERMILLE * 256 // 1000


@lru_cache(maxsize=4)
def load_split(split: str, root: str | None = None) -> torch.Tensor:
    """The ``"train"`` or ``"heldout"`` text as a uint8 tensor of bytes."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    base = Path(root) if root else stdlib_root()
    chunks = []
    for rel in stdlib_files(base):
        if is_heldout(rel) == (split == "heldout"):
            chunks.append((base / rel).read_bytes().replace(b"\x00", b""))
            chunks.append(bytes([SEPARATOR]))
    if not chunks:
        raise FileNotFoundError(f"no Python files for split {split!r} under {base}")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def heldout_modules(root: str | None = None) -> list[str]:
    """Dotted names of the held-out modules (for the README and sanity checks)."""
    base = Path(root) if root else stdlib_root()
    return [".".join(rel.with_suffix("").parts) for rel in stdlib_files(base) if is_heldout(rel)]


def train_batches(
    data: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of random windows: ``x`` int64 ``[B, T]`` and the next bytes ``y``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx].long()
        yield chunk[:, :-1], chunk[:, 1:]


def eval_windows(data: torch.Tensor, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced windows ``(x, y)`` of the text (the same every time)."""
    if len(data) < seq_len + 1:
        raise ValueError(f"text of {len(data)} bytes is shorter than one window of {seq_len + 1}")
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long()
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def encode(text: str) -> torch.Tensor:
    """Bytes of ``text`` as int64 token ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(tokens: torch.Tensor) -> str:
    return bytes(int(t) for t in tokens.reshape(-1)).decode("utf-8", errors="replace")
