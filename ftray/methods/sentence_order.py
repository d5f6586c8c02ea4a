"""sentence_order: predict the right order of shuffled sentences; the labels come from the text itself.

Each document is cut into sentences and then into windows of `method.n_sentences` consecutive sentences;
each window is shuffled (the order drawn from (text, window), so before/after see the same task)
and joined with the tokenizer's separator ([CLS] a [SEP] b [SEP] c [SEP] on BERT), the longest sentences cut
first so that every one of them is seen within `data.max_length`. The class is the shuffled order's index among
all n! orders (`losses.sentence_order_label`). An encoder (or decoder) + sequence-classification head; judged by
held-out accuracy against chance (1 / n!).
"""

from __future__ import annotations

import itertools
import math
import re
import zlib

import torch
import torch.nn.functional as F

from ftray.methods._base import MethodBase
from ftray.methods._enc import load_auto, max_over_ranks, pad, tokenize
from ftray.methods.losses import sentence_order_label

__all__ = ["SentenceOrder", "split_sentences"]

_SENT = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(" ".join(text.split())) if len(s.strip()) > 1]


def _fit(tokenizer, sents: list[str], sep: str, max_length: int) -> tuple[list[str], bool]:
    """The sentences, the longest cut first (at a token boundary) until all of them, joined, fit max_length.
    A plain cut at max_length drops the last sentence shown (14% of WikiText-2's 3-sentence windows exceed
    128 tokens), and without it the order is unknowable."""
    pieces = [tokenizer(s, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] for s in sents]
    lens = [len(p) for p in pieces]
    budget = max_length - (len(tokenizer(sep.join(sents))["input_ids"]) - sum(lens))  # [CLS], [SEP]s, ...
    if sum(lens) <= budget:
        return sents, False
    while sum(lens) > max(budget, len(lens)):
        lens[lens.index(max(lens))] -= 1
    return [s[: p[k - 1][1]] if k else s[:1] for s, p, k in zip(sents, pieces, lens, strict=True)], True


class SentenceOrder(MethodBase):
    name = "sentence_order"
    formats = ("text",)
    task_type = "SEQ_CLS"
    packable = False

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "accuracy", "chance"}

    def load_base(self, path, dtype, spec):
        from transformers import AutoModelForSequenceClassification

        from ftray.models.load import load_tokenizer

        orders = list(itertools.permutations(range(spec.method.n_sentences)))
        model = load_auto(
            AutoModelForSequenceClassification,
            path,
            dtype,
            spec,
            num_labels=len(orders),
            id2label={i: "-".join(map(str, o)) for i, o in enumerate(orders)},
            label2id={"-".join(map(str, o)): i for i, o in enumerate(orders)},
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(spec.model.tokenizer or path).pad_token_id
        return model

    def examples(self, row, tokenizer, spec):
        n = spec.method.n_sentences
        sents = split_sentences(row["text"])
        sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " "
        out = []
        every = list(itertools.permutations(range(n)))  # label i is every[i] (`losses.sentence_order_label`)
        k = min(spec.method.orders_per_window, len(every))
        for j in range(0, len(sents) - n + 1, n):
            gen = torch.Generator().manual_seed(zlib.crc32(row["text"].encode()) + j)  # the text alone: the data cache key knows it
            if k == 1:
                orders = [torch.randperm(n, generator=gen).tolist()]
            else:  # k distinct orders of the n!, drawn the same way
                orders = [list(every[i]) for i in torch.randperm(len(every), generator=gen)[:k].tolist()]
            for order in orders:
                window, cut = _fit(tokenizer, [sents[j + i] for i in order], sep, spec.data.max_length)
                ids, over = tokenize(tokenizer, sep.join(window), spec.data.max_length)
                out.append({"input_ids": ids, "label": sentence_order_label(order), "truncated": cut or over})
        return out

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "label": torch.tensor([int(e["label"]) for e in examples])}

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["label"]), {"target_tokens": float(len(batch["label"]))}

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        examples = [(i, e) for i, r in enumerate(rows) for e in self.examples(r, tokenizer, spec)]
        correct, windows = [0.0] * len(rows), [0.0] * len(rows)
        for b in range(max_over_ranks(math.ceil(len(examples) / 16), ctx.device)):
            chunk = examples[b * 16 : (b + 1) * 16]
            dummy = [{"input_ids": tokenize(tokenizer, ".", 8)[0], "label": 0}]
            batch = self.collate([e for _, e in chunk] or dummy, tokenizer.pad_token_id)
            pred = model(input_ids=batch["input_ids"].to(ctx.device), attention_mask=batch["attention_mask"].to(ctx.device)).logits.argmax(-1)
            for k, (i, _) in enumerate(chunk):  # a dummy pass (no chunk) only keeps ZeRO-3 ranks in step
                correct[i] += float(pred[k].item() == int(batch["label"][k]))
                windows[i] += 1.0
        return [{"order_correct": c, "order_windows": w, "chance": 1.0 / math.factorial(spec.method.n_sentences)} for c, w in zip(correct, windows, strict=True)]

    def summarize(self, eval_loss, scores):
        out = {"eval_loss": eval_loss}
        if scores.get("order_windows"):
            out.update(accuracy=scores["order_correct"] / scores["order_windows"], chance=scores["chance"])
        return out

    def save_extra(self, model, tokenizer, folder, spec):
        return None  # the orders are the saved model's id2label ("2-0-1": the first sentence shown is the third)
