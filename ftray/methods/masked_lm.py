"""masked_lm: predict masked words (BERT's objective) on plain text with an encoder + MLM head.

A model saved with its MLM head keeps it; an encoder saved without one (all-MiniLM-L6-v2 is a bare
BertModel) gets a fresh head: the output projection is tied to the pre-trained word embeddings, the
transform layer and bias start from scratch. Masks are drawn once per example from (text, chunk),
so the held-out loss before and after training is measured on the same masks. Judged by held-out
masked-token loss, perplexity (its exp) and masked-token accuracy.

The vocabulary projection runs at the masked positions only (`_masked_logits`): on MiniLM it is about
as much work per token as the 6 encoder layers, and only ~15 % of the positions are targets.
"""

from __future__ import annotations

import math
import zlib

import torch

from ftray.data.encode import IGNORE
from ftray.methods._base import MethodBase
from ftray.methods._enc import load_auto, max_over_ranks, pad
from ftray.methods.losses import mask_tokens, masked_token_cross_entropy

__all__ = ["MaskedLM"]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts around a text ([CLS] ... [SEP] for BERT), found by
    encoding one word with and without them."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k], full[k + len(bare) :]
    return [], []


def _masked_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLM head's logits at the target positions only ([N, vocab]) and their labels ([N]): a forward
    pre-hook hands the output projection (`get_output_embeddings()`, the vocabulary-sized matmul with its
    bias) the N hidden states at those positions instead of all B x T. The same logits as the full head's
    at those positions; the positions that are not targets never reach the loss anyway."""
    labels = batch["labels"].to(batch["input_ids"].device)
    where = labels != IGNORE
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model (or the peft model) in .module
    head = inner.get_output_embeddings()
    hook = None if head is None else head.register_forward_pre_hook(lambda _mod, args: (args[0][where], *args[1:]))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        if hook is not None:
            hook.remove()
    if logits.dim() == 3:  # no output embeddings to hook (or not the projection the model ran): select afterwards
        logits = logits[where]
    return logits, labels[where]


class MaskedLM(MethodBase):
    name = "masked_lm"
    formats = ("text",)
    task_type = "FEATURE_EXTRACTION"  # peft has no masked-LM task type; this one passes the model's output through
    packable = False

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "perplexity", "masked_accuracy"}

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        from ftray.models.load import ModelError

        if tokenizer.mask_token_id is None:
            raise ModelError(
                f"model.path: {spec.model.tokenizer or spec.model.path}: the tokenizer has no mask token; "
                "masked_lm needs one (an encoder such as BERT)"
            )
        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ModelError(f"model.path: {spec.model.path}: a `{config.model_type}` model has no masked-LM form")

    def load_base(self, path, dtype, spec):
        from transformers import AutoModelForMaskedLM

        return load_auto(AutoModelForMaskedLM, path, dtype, spec)

    def examples(self, row, tokenizer, spec):
        body = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        prefix, suffix = _special_frame(tokenizer)
        size = max(1, spec.data.max_length - len(prefix) - len(suffix))
        special = set(tokenizer.all_special_ids)
        out = []
        for j in range(0, len(body), size):
            ids = torch.tensor(prefix + body[j : j + size] + suffix)
            maskable = torch.tensor([t not in special for t in ids.tolist()])
            if not maskable.any():
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(row["text"].encode()) + j)  # the text alone: the data cache key knows it
            select, action = torch.rand(len(ids), generator=gen), torch.rand(len(ids), generator=gen)
            random_ids = torch.randint(len(tokenizer), (len(ids),), generator=gen)
            if not (maskable & (select < spec.method.mask_prob)).any():  # every example teaches something
                select[torch.where(maskable, select, torch.full_like(select, 2.0)).argmin()] = 0.0
            inputs, labels = mask_tokens(ids, maskable, tokenizer.mask_token_id, select, action, random_ids, spec.method.mask_prob)
            out.append({"input_ids": inputs.tolist(), "labels": labels.tolist(), "truncated": False})
        return out

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        labels = torch.full_like(ids, IGNORE)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(list(e["labels"]))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, batch):
        logits, labels = _masked_logits(model, batch)
        loss, n = masked_token_cross_entropy(logits, labels)
        return loss, {"target_tokens": float(n)}

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        examples = [(i, e) for i, r in enumerate(rows) for e in self.examples(r, tokenizer, spec)]
        correct, targets = [0.0] * len(rows), [0.0] * len(rows)
        n_batches = max_over_ranks(math.ceil(len(examples) / 16), ctx.device)
        for b in range(n_batches):
            chunk = examples[b * 16 : (b + 1) * 16]
            dummy = [{"input_ids": [tokenizer.pad_token_id], "labels": [IGNORE]}]
            batch = {k: v.to(ctx.device) for k, v in self.collate([e for _, e in chunk] or dummy, tokenizer.pad_token_id).items()}
            logits, labels = _masked_logits(model, batch)
            if not chunk:  # a dummy pass, so every rank runs as many as the busiest (ZeRO-3)
                continue
            hit = (logits.argmax(-1) == labels).float()
            row = torch.nonzero(batch["labels"] != IGNORE)[:, 0]  # each target's example, in the same order
            for k, (i, _) in enumerate(chunk):
                correct[i] += float(hit[row == k].sum())
                targets[i] += float((row == k).sum())
        # Token-weighted accuracy = mean(correct) / mean(targets): the loop averages both over rows.
        return [{"masked_correct": c, "masked_targets": t} for c, t in zip(correct, targets, strict=True)]

    def summarize(self, eval_loss, scores):
        out = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
        if scores.get("masked_targets"):
            out["masked_accuracy"] = scores["masked_correct"] / scores["masked_targets"]
        return out

