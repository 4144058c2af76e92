"""The LoRA adapter module and the graph facts both LoRA passes need (not a pass).

An adapter of rank ``r`` holds ``A`` (r × in, kaiming-uniform) and ``B`` (out × r, zeros), so
that adding it changes no output; its update to the base weight is ``ΔW = (alpha / r) · B A``.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from qgraph.core.meta import QUANTIZER_KEY


class LoraAdapter(nn.Module):
    """The trainable pair of one adapted linear: ``ΔW = scaling · B @ A``."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, init: str,
                 generator: torch.Generator, like: torch.Tensor, target: str) -> None:
        super().__init__()
        self.r, self.alpha, self.scaling, self.target = r, alpha, alpha / r, target
        a = torch.empty(r, in_features, dtype=torch.float32)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a, std=1.0 / r, generator=generator)
        self.lora_A = nn.Parameter(a.to(dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=like.dtype, device=like.device))

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B @ A`` (out × in), the update a merge adds to the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{self.target}: r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def is_quantizer_call(node: object) -> bool:
    """True for the ``call_module`` node of an observer / fake-quant module."""
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and QUANTIZER_KEY in node.meta
