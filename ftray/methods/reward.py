"""reward: a reward model learns which of two replies people preferred (Bradley-Terry on `preference` rows).

A scalar head (`AutoModelForSequenceClassification`, one label) on a causal LM (it reads the last
token) or an encoder (it reads the pooled [CLS]). Each reply is scored with its conversation
(`history` + `prompt` + reply) rendered by the chat template, exactly as the Serve app's scorer renders
a `/v1/rewards` input, so a saved run (`model/`, or `merged/` for LoRA) is served as is.
Judged by pairwise accuracy on held-out pairs (a tie counts half) and the mean margin r_chosen - r_rejected,
beside the length heuristic (the longer reply is chosen) and the accuracy on the length-balanced pairs
(`ftray.metrics.length_summary`): a figure the heuristic matches shows that length, not preference, was learnt.
"""

from __future__ import annotations

import torch

from ftray.methods._base import MethodBase
from ftray.methods._enc import load_auto, pad
from ftray.methods.losses import bradley_terry_loss
from ftray.metrics import length_keys, length_summary

__all__ = ["Reward", "cut_ids", "render"]


def render(tokenizer, row: dict, reply: str) -> str:
    """The scored text of one reply: what `ScorerEngine.text` renders for {"messages": [...]}."""
    msgs = [*row.get("history", []), {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": reply}]
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def cut_ids(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """The scored tokens of a reply in its conversation, and whether it was cut: at most `max_length`, the
    conversation losing its start, never the reply's end (the last token is what a decoder's head reads). A cut on
    the right dropped the replies of every pair whose conversation fills `max_length` before them: both sides the same
    tokens, a forced tie that taught nothing (51 of HH-RLHF harmless's 317 test pairs and 235 of its 1,669 train
    pairs at 256 tokens on SmolLM2). The Serve scorer cuts a `/v1/rewards` input the same way (`ScorerEngine`)."""
    full = tokenizer(text)["input_ids"]
    if len(full) <= max_length:
        return full, False
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # the tokenizer's own cut: special tokens it adds stay, as in the scorer
    try:
        return tokenizer(text, truncation=True, max_length=max_length)["input_ids"], True
    finally:
        tokenizer.truncation_side = side


class Reward(MethodBase):
    name = "reward"
    formats = ("preference",)
    task_type = "SEQ_CLS"
    packable = False
    scores_carry_loss = True  # a pair's loss and its accuracy come from the same forward

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "accuracy", "margin", "length_heuristic_accuracy", "balanced_accuracy"}

    def load_base(self, path, dtype, spec):
        from transformers import AutoModelForSequenceClassification

        from ftray.models.load import load_tokenizer

        model = load_auto(AutoModelForSequenceClassification, path, dtype, spec, num_labels=1)
        if model.config.pad_token_id is None:  # decoder heads read the last non-pad token
            model.config.pad_token_id = load_tokenizer(spec.model.tokenizer or path).pad_token_id
        return model

    def examples(self, row, tokenizer, spec):
        n = spec.data.max_length
        chosen, cut_c = cut_ids(tokenizer, render(tokenizer, row, row["chosen"]), n)
        rejected, cut_r = cut_ids(tokenizer, render(tokenizer, row, row["rejected"]), n)
        return [{"input_ids": chosen, "rejected_ids": rejected, "truncated": cut_c or cut_r}]

    def collate(self, examples, pad_id):
        # Chosen then rejected, in one forward pass (the same number of passes on every rank, as ZeRO-3 needs).
        ids, mask = pad([list(e["input_ids"]) for e in examples] + [list(e["rejected_ids"]) for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def _rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        return r.chunk(2)

    def loss(self, model, batch):
        chosen, rejected = self._rewards(model, batch)
        return bradley_terry_loss(chosen, rejected), {"target_tokens": float(len(chosen))}

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        out = []
        for i in range(0, len(rows), 16):
            chunk = rows[i : i + 16]
            ex = [e for r in chunk for e in self.examples(r, tokenizer, spec)]
            batch = {k: v.to(ctx.device) for k, v in self.collate(ex, tokenizer.pad_token_id).items()}
            chosen, rejected = self._rewards(model, batch)
            losses = bradley_terry_loss(chosen, rejected, reduce=False)
            for row, lo, c, r in zip(chunk, losses.tolist(), chosen.tolist(), rejected.tolist(), strict=True):
                acc = float(c > r) + 0.5 * float(c == r)
                out.append({"loss": lo, "accuracy": acc, "margin": c - r, **length_keys(row, acc)})
        return out

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, **length_summary(scores, "accuracy")}

    def save_extra(self, model, tokenizer, folder, spec):
        return None  # num_labels=1 and the *ForSequenceClassification architecture are in config.json
