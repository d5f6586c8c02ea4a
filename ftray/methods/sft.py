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


class SFT(MethodBase):
    name = "sft"
    formats = ("instruction", "chat", "prompt_completion")
    task_type = "CAUSAL_LM"
    packable = True

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


    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        if not spec.method.exact_match:
            return []
        scores = []
        tokenizer.padding_side = "left"
        for i in bar(range(0, len(rows), 16), "generate", unit="batch"):
            chunk = rows[i : i + 16]
            prompts, refs = zip(*(render_prompt(tokenizer, r) for r in chunk), strict=True)
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(ctx.device)
            out = model.generate(
                **enc,
                max_new_tokens=spec.method.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=ctx.synced_gpus,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            scores += [{"exact_match": float(t.strip() == r.strip())} for t, r in zip(texts, refs, strict=True)]
        return scores

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0)), **scores}
