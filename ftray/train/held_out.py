"""The held-out evaluation of a run: the loss over the eval examples, then the method's per-row scores
(`score_rows`) over the eval rows, averaged over every rank and handed to `summarize`. The training loop
runs it on each rank of a job; `ftray eval` on one process (`world` 1, nothing to reduce). No Ray."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ftray.progress import bar

__all__ = ["evaluate_held_out"]


def _no_reduce(values: list[float]) -> list[float]:
    return values


@torch.no_grad()
def evaluate_held_out(method, model, examples: list[dict], rows: list[dict], tokenizer, spec, ctx, *, micro_batch: int,
                      rank: int = 0, world: int = 1, all_sum: Callable[[list[float]], list[float]] = _no_reduce) -> dict:
    """`model`: what the loss runs on (a DeepSpeed engine or a model); `examples`: the eval split's
    tokenized examples (all of them: each rank takes its share); `rows`: the eval rows `score_rows` judges;
    `all_sum`: sums a list of numbers over the ranks. Returns `method.summarize(...)`, the model's training
    mode left as it was."""
    module = getattr(model, "module", model)  # a DeepSpeed engine's model (generation, scores)
    was = module.training
    model.eval()
    n = len(examples)
    per_rank = math.ceil(n / world)
    mine = [i for i in (rank + k * world for k in range(per_rank)) if i < n]
    device = torch.device(ctx.device)
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively); a rank
    # out of examples runs a copy of example 0 and counts it with weight 0. A method whose row scores carry
    # each row's loss (`scores_carry_loss`) is not run twice: its loss is the mean over the scored rows.
    loss_sum, tokens = 0.0, 0.0
    if not method.scores_carry_loss:
        for s in bar(range(0, math.ceil(per_rank / micro_batch) * micro_batch, micro_batch), "eval loss", unit="batch"):
            chunk = mine[s : s + micro_batch]
            weight = 1.0 if chunk else 0.0
            batch = method.collate([examples[i] for i in (chunk or [0])], tokenizer.pad_token_id)
            loss, info = method.loss(model, {k: v.to(device) for k, v in batch.items()})
            count = info.get("target_tokens", float(len(chunk)))
            loss_sum += weight * float(loss) * count
            tokens += weight * count
        loss_sum, tokens = all_sum([loss_sum, tokens])
    # The rows, dealt out the same way; a rank short of rows judges row 0 again and does not count it.
    n_rows = len(rows)
    mine_rows = [rank + k * world for k in range(math.ceil(n_rows / world))]
    shard = [rows[i] if i < n_rows else rows[0] for i in mine_rows]
    scores = method.score_rows(module, tokenizer, shard, spec, ctx) if shard else []
    keys = sorted({k for sc in scores for k in sc})
    real = [sc for sc, i in zip(scores, mine_rows, strict=False) if i < n_rows]
    totals = all_sum([sum(sc[k] for sc in real) for k in keys] + [float(len(real))]) if keys else []
    agg = {k: totals[j] / max(totals[-1], 1.0) for j, k in enumerate(keys)}
    model.train(was)
    if method.scores_carry_loss:
        return method.summarize(agg.pop("loss", math.nan), agg)
    return method.summarize(loss_sum / tokens if tokens else math.nan, agg)
