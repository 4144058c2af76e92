"""A row of the LLM table, and the labels of the LoRA rows the table and its LoRA runs share."""

from __future__ import annotations

from dataclasses import dataclass

LORA_ROWS = ("QAT + LoRA 8da4w, merged", "QAT + LoRA 8da4w, unmerged")


@dataclass
class Row:
    name: str
    ppl: float | None
    note: str = ""
