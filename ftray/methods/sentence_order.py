"""sentence_order: predict the right order of shuffled sentences; the labels come from the text itself.

Each document is cut into sentences and then into windows of `method.n_sentences` consecutive sentences;
each window is shuffled (the order drawn from (text, window), so before/after see the same task)
and joined with the tokenizer's separator ([CLS] a [SEP] b [SEP] c [SEP] on BERT), the longest sentences cut
first so that every one of them is seen within `data.max_length`. The class is the shuffled order's index among
all n! orders (`losses.sentence_order_label`). An encoder (or decoder) + sequence-classification head; judged by
held-out accuracy against chance (1 / n!).

`method.objective: pairwise` reads two sentences at a time instead ([CLS] a [SEP] b [SEP]: does a come before b?,
ALBERT's sentence-order prediction): every ordered pair of every window is an example, and a window's order is the
permutation whose pairs score highest. One 2-way decision per pair is an easier thing to learn than one of n!
orders from the whole window, and a window gives n(n-1) examples instead of one.
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

__all__ = ["SentenceOrder", "best_orders", "split_sentences", "windows"]

PAIR_LABELS = {0: "after", 1: "before"}  # pairwise: is the first sentence shown before the second in the text?

_SENT = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(" ".join(text.split())) if len(s.strip()) > 1]


def windows(text: str, n: int) -> list[tuple[int, list[str]]]:
    """The text's consecutive, non-overlapping windows of n sentences: (index of the first sentence, the sentences)."""
    sents = split_sentences(text)
    return [(j, sents[j : j + n]) for j in range(0, len(sents) - n + 1, n)]


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


def best_orders(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float], n: int) -> list[tuple[int, ...]]:
    """The orders of n sentences whose pairs score highest. `before[i, k]` / `after[i, k]`: the log-probabilities
    that sentence i, shown first beside k, comes before / after it; "i before k" scores before[i, k] + after[k, i]
    (the pair read both ways). Every order tied at the top is returned: a model that cannot tell them apart gets
    1 / (number tied) of a window right, never the text's order by default."""
    pair = {(i, k): before[i, k] + after[k, i] for i, k in itertools.permutations(range(n), 2)}
    score = {o: sum(pair[o[a], o[b]] for a, b in itertools.combinations(range(n), 2)) for o in itertools.permutations(range(n))}
    top = max(score.values())
    return [o for o, v in score.items() if v >= top - 1e-6 * max(1.0, abs(top))]


class SentenceOrder(MethodBase):
    name = "sentence_order"
    formats = ("text",)
    task_type = "SEQ_CLS"
    packable = False

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "accuracy", "chance"} | ({"pair_accuracy"} if spec.method.objective == "pairwise" else set())

    def load_base(self, path, dtype, spec):
        from transformers import AutoModelForSequenceClassification

        from ftray.models.load import load_tokenizer

        if spec.method.objective == "pairwise":
            id2label = PAIR_LABELS
        else:
            id2label = {i: "-".join(map(str, o)) for i, o in enumerate(itertools.permutations(range(spec.method.n_sentences)))}
        model = load_auto(
            AutoModelForSequenceClassification,
            path,
            dtype,
            spec,
            num_labels=len(id2label),
            id2label=id2label,
            label2id={v: i for i, v in id2label.items()},
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(spec.model.tokenizer or path).pad_token_id
        return model

    def _pairs(self, row, tokenizer, spec) -> list[tuple[int, int, int, dict]]:
        """pairwise: (window, i, k, example) for every ordered pair i != k of every window, sentence i shown first;
        label 1 ("before") when i comes before k in the text."""
        n = spec.method.n_sentences
        sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " "
        out = []
        for w, (_, sents) in enumerate(windows(row["text"], n)):
            for i, k in itertools.permutations(range(n), 2):
                pair, cut = _fit(tokenizer, [sents[i], sents[k]], sep, spec.data.max_length)
                ids, over = tokenize(tokenizer, sep.join(pair), spec.data.max_length)
                out.append((w, i, k, {"input_ids": ids, "label": int(i < k), "truncated": cut or over}))
        return out

    def examples(self, row, tokenizer, spec):
        if spec.method.objective == "pairwise":
            return [e for *_, e in self._pairs(row, tokenizer, spec)]
        n = spec.method.n_sentences
        sep = f" {tokenizer.sep_token} " if tokenizer.sep_token else " "
        out = []
        every = list(itertools.permutations(range(n)))  # label i is every[i] (`losses.sentence_order_label`)
        k = min(spec.method.orders_per_window, len(every))
        for j, sents in windows(row["text"], n):
            gen = torch.Generator().manual_seed(zlib.crc32(row["text"].encode()) + j)  # the text alone: the data cache key knows it
            if k == 1:
                orders = [torch.randperm(n, generator=gen).tolist()]
            else:  # k distinct orders of the n!, drawn the same way
                orders = [list(every[i]) for i in torch.randperm(len(every), generator=gen)[:k].tolist()]
            for order in orders:
                window, cut = _fit(tokenizer, [sents[i] for i in order], sep, spec.data.max_length)
                ids, over = tokenize(tokenizer, sep.join(window), spec.data.max_length)
                out.append({"input_ids": ids, "label": sentence_order_label(order), "truncated": cut or over})
        return out

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "label": torch.tensor([int(e["label"]) for e in examples])}

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["label"]), {"target_tokens": float(len(batch["label"]))}

    def _logits(self, model, tokenizer, examples: list[dict], ctx):
        """Logits of `examples` in batches of 16; every rank makes the same number of passes (a dummy one when it
        has run out) so that ZeRO-3 ranks stay in step."""
        out = []
        for b in range(max_over_ranks(math.ceil(len(examples) / 16), ctx.device)):
            chunk = examples[b * 16 : (b + 1) * 16]
            dummy = [{"input_ids": tokenize(tokenizer, ".", 8)[0], "label": 0}]
            batch = self.collate(chunk or dummy, tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(ctx.device), attention_mask=batch["attention_mask"].to(ctx.device)).logits
            out += list(logits.float().cpu()[: len(chunk)])
        return out

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        if spec.method.objective == "pairwise":
            return self._score_pairs(model, tokenizer, rows, spec, ctx)
        examples = [(i, e) for i, r in enumerate(rows) for e in self.examples(r, tokenizer, spec)]
        correct, windows = [0.0] * len(rows), [0.0] * len(rows)
        for (i, e), logits in zip(examples, self._logits(model, tokenizer, [e for _, e in examples], ctx), strict=True):
            correct[i] += float(int(logits.argmax()) == int(e["label"]))
            windows[i] += 1.0
        return [{"order_correct": c, "order_windows": w, "chance": 1.0 / math.factorial(spec.method.n_sentences)} for c, w in zip(correct, windows, strict=True)]

    def _score_pairs(self, model, tokenizer, rows, spec, ctx):
        """pairwise: each window's order is `best_orders` of its pairs' log-probabilities (a tie of k orders counts
        1/k if the text's order is among them); a pair is right when "i before k" outscores "k before i"."""
        n = spec.method.n_sentences
        keys = [(r, w, i, k, e) for r, row in enumerate(rows) for w, i, k, e in self._pairs(row, tokenizer, spec)]
        logp = [x.log_softmax(-1) for x in self._logits(model, tokenizer, [e for *_, e in keys], ctx)]
        windows: dict[tuple[int, int], tuple[dict, dict]] = {}
        for (r, w, i, k, _), lp in zip(keys, logp, strict=True):
            before, after = windows.setdefault((r, w), ({}, {}))
            before[i, k], after[i, k] = float(lp[1]), float(lp[0])
        out = [{"order_correct": 0.0, "order_windows": 0.0, "pair_correct": 0.0, "pair_total": 0.0,
                "chance": 1.0 / math.factorial(n)} for _ in rows]
        text_order = tuple(range(n))
        for (r, _), (before, after) in windows.items():
            tied = best_orders(before, after, n)
            out[r]["order_correct"] += (text_order in tied) / len(tied)
            out[r]["order_windows"] += 1.0
            for i, k in itertools.combinations(range(n), 2):
                first, second = before[i, k] + after[k, i], before[k, i] + after[i, k]
                out[r]["pair_correct"] += 1.0 if first > second else 0.5 if first == second else 0.0
                out[r]["pair_total"] += 1.0
        return out

    def summarize(self, eval_loss, scores):
        out = {"eval_loss": eval_loss}
        if scores.get("order_windows"):
            out.update(accuracy=scores["order_correct"] / scores["order_windows"], chance=scores["chance"])
        if scores.get("pair_total"):
            out["pair_accuracy"] = scores["pair_correct"] / scores["pair_total"]
        return out

    def save_extra(self, model, tokenizer, folder, spec):
        return None  # the saved model's id2label names its classes: an order ("2-0-1": the first sentence shown is the
        # third) or, pairwise, "before" / "after" (is the first sentence of the pair shown before the second?)
