"""causal_lm: continued pretraining on domain text; every token is a target. Judged by perplexity."""

from __future__ import annotations

import math

from ftray.data.encode import encode_row
from ftray.methods._base import MethodBase
from ftray.methods._lm import collate_tokens, lm_loss, load_causal_lm


class CausalLM(MethodBase):
    name = "causal_lm"
    formats = ("text",)
    task_type = "CAUSAL_LM"
    packable = True
    group_by_length = True

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "perplexity"}

    def load_base(self, path, dtype, spec):
        return load_causal_lm(path, dtype, spec)

    def examples(self, row, tokenizer, spec):
        return encode_row(tokenizer, row, spec.data.max_length)

    def collate(self, examples, pad_id):
        return collate_tokens(examples, pad_id)

    def loss(self, model, batch):
        return lm_loss(model, batch)


    def score_rows(self, model, tokenizer, rows, spec, ctx):
        return []

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
