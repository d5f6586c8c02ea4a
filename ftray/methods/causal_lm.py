"""causal_lm: continued pretraining on domain text; every token is a target. Judged by perplexity."""

from __future__ import annotations

import math

from ftray.methods._lm import collate_tokens, lm_loss


class CausalLM:
    name = "causal_lm"
    formats = ("text",)

    def build_model(self, spec, base):
        return base

    def collate(self, examples, pad_id):
        return collate_tokens(examples, pad_id)

    def loss(self, model, batch):
        return lm_loss(model, batch)

    def score_rows(self, model, tokenizer, rows, spec, ctx):
        return []

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
