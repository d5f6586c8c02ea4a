"""Methods: one file each. A method says what its rows look like, how a batch is built, what the
loss is and how it is judged; the loop, DeepSpeed, checkpoints and Ray are not its business.

The registry is an explicit dict, checked by a test against the files in this folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ftray.methods import causal_lm, sft

__all__ = ["EvalContext", "Method", "REGISTRY", "get_method"]


@dataclass(frozen=True)
class EvalContext:
    """What a method's evaluation may need to know about where it runs (not how)."""

    synced_gpus: bool = False  # every rank must run the same number of forward passes (ZeRO-3)
    device: str = "cpu"


class Method(Protocol):
    name: str
    formats: tuple[str, ...]  # data formats (see ftray.data.rows) this method reads

    def build_model(self, spec, base: torch.nn.Module) -> torch.nn.Module: ...
    def collate(self, examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]: ...
    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...
    def score_rows(self, model, tokenizer, rows: list[dict], spec, ctx: EvalContext) -> list[dict[str, float]]: ...
    def summarize(self, eval_loss: float, scores: dict[str, float]) -> dict[str, float]: ...


REGISTRY: dict[str, Any] = {
    "sft": sft.SFT(),
    "causal_lm": causal_lm.CausalLM(),
}


def get_method(kind: str) -> Method:
    return REGISTRY[kind]
