"""sft: supervised fine-tuning on instruction / chat / prompt-completion rows; loss on answer tokens only.

Judged by held-out loss (and perplexity); with `method.exact_match`, also by the share of held-out
prompts whose greedy answer equals the reference.
"""

from __future__ import annotations

import math

import torch

from ftray.data.encode import encode_row, render_prompt
from ftray.methods._base import MethodBase
from ftray.methods._lm import collate_tokens, lm_loss, load_causal_lm
from ftray.progress import bar


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, ctx, batch: int = 16) -> list[str]:
    """The model's greedy answer to each supervised row's prompt (`render_prompt`), generated in left-padded
    batches: what `exact_match` judges, and what a benchmark scores with its own metric (F1, chrF)."""
    answers: list[str] = []
    tokenizer.padding_side = "left"
    for i in bar(range(0, len(rows), batch), "generate", unit="batch"):
        prompts = [render_prompt(tokenizer, r)[0] for r in rows[i : i + batch]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(ctx.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=ctx.synced_gpus,
        )
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


class SFT(MethodBase):
    name = "sft"
    formats = ("instruction", "chat", "prompt_completion")
    task_type = "CAUSAL_LM"
    packable = True
    group_by_length = True

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "perplexity"} | ({"exact_match"} if spec.method.exact_match else set())

    def load_base(self, path, dtype, spec):
        return load_causal_lm(path, dtype, spec)

    def examples(self, row, tokenizer, spec):
        return encode_row(tokenizer, row, spec.data.max_length)

    def collate(self, examples, pad_id):
        return collate_tokens(examples, pad_id)

    def loss(self, model, batch):
        return lm_loss(model, batch)


    def score_rows(self, model, tokenizer, rows, spec, ctx):
        if not spec.method.exact_match:
            return []
        answers = greedy_answers(model, tokenizer, rows, spec.method.max_new_tokens, ctx)
        refs = [render_prompt(tokenizer, r)[1] for r in rows]
        return [{"exact_match": float(t.strip() == r.strip())} for t, r in zip(answers, refs, strict=True)]

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0)), **scores}
