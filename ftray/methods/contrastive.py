"""contrastive: a sentence-embedding encoder (mean pooling) trained on related pairs.

Rows (`pairs`): anchor/positive[/negative] -> InfoNCE with in-batch negatives (every other positive in
the micro-batch is a negative, on every data-parallel rank with `method.gather_across_ranks`; `negative`
adds hard negatives), or sentence1/sentence2/score ->
cosine-similarity loss towards `score / method.score_max`. Judged by the Spearman correlation of
cosine vs score on held-out scored pairs (recall@1 among held-out positives for anchor rows).

A fully saved model is a sentence-transformers folder (modules.json, sentence_bert_config.json,
1_Pooling/config.json): `SentenceTransformer(path)` loads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ftray.methods._base import MethodBase
from ftray.methods._enc import (
    all_gather_with_grad,
    gather_rows,
    load_auto,
    pad,
    row_hash,
    strip_padding,
    tokenize,
    write_sentence_transformers,
)
from ftray.methods.losses import cosine_similarity_loss, info_nce, mean_pool
from ftray.metrics import spearman

__all__ = ["Contrastive", "embed"]


def embed(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


class Contrastive(MethodBase):
    name = "contrastive"
    formats = ("pairs",)
    task_type = "FEATURE_EXTRACTION"
    packable = False

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "spearman"}  # spearman: held-out scored pairs

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        from ftray.config import SpecError

        for field, checked in (("data.train", train_rows), ("data.eval", eval_rows)):
            if checked is not None and len({"score" in r for r in checked.rows}) > 1:
                raise SpecError(f"{field}: mixes scored pairs (sentence1/sentence2/score) with anchor/positive rows")

    def load_base(self, path, dtype, spec):
        from transformers import AutoModel

        model = load_auto(AutoModel, path, dtype, spec)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # mean pooling reads the last hidden state; an unused pooler would get no gradient
        return model

    def examples(self, row, tokenizer, spec):
        n = spec.data.max_length
        scored = "score" in row
        a, cut_a = tokenize(tokenizer, row["sentence1" if scored else "anchor"], n)
        b, cut_b = tokenize(tokenizer, row["sentence2" if scored else "positive"], n)
        neg, cut_n = tokenize(tokenizer, row["negative"], n) if row.get("negative") else ([], False)
        return [
            {
                "input_ids": a,
                "positive_ids": b,
                "negative_ids": neg,
                # NaN marks an anchor/positive row (a column must have one type in every shard).
                "score": row["score"] / spec.method.score_max if scored else math.nan,
                "temperature": spec.method.temperature,  # loss() sees only the batch
                "gather_across_ranks": spec.method.gather_across_ranks,
                "truncated": cut_a or cut_b or cut_n,
            }
        ]

    def collate(self, examples, pad_id):
        negs = [list(e["negative_ids"]) for e in examples if e.get("negative_ids") is not None and len(e["negative_ids"])]
        seqs = [list(e["input_ids"]) for e in examples] + [list(e["positive_ids"]) for e in examples] + negs
        ids, mask = pad(seqs, pad_id)
        score = torch.tensor([float(e["score"]) for e in examples])
        if score.isnan().any() and not score.isnan().all():
            raise ValueError("a batch mixes scored and anchor/positive pairs")
        # Every text of the batch in one forward pass (the same number of passes on every rank, as ZeRO-3 needs).
        temperature = torch.tensor(float(examples[0].get("temperature") or 0.05))
        gather = torch.tensor(bool(examples[0].get("gather_across_ranks", True)))
        return {"input_ids": ids, "attention_mask": mask, "score": score, "temperature": temperature,
                "gather_across_ranks": gather}

    def loss(self, model, batch):
        emb = embed(model, batch["input_ids"], batch["attention_mask"])
        b = len(batch["score"])
        a, p, n = emb[:b], emb[b : 2 * b], emb[2 * b :]
        if batch["score"].isnan().all():
            offset = 0
            if bool(batch["gather_across_ranks"]):
                # Anchor i of rank r is global pair offset + i. DeepSpeed averages the ranks' gradients and
                # the gather's backward sums what every rank's loss sends each positive, so the update is
                # the gradient of the mean over all world x B anchors: one worker holding the whole batch.
                p, offset = all_gather_with_grad(p)
                n, _ = all_gather_with_grad(n)
            return info_nce(a, p, n, float(batch["temperature"]), offset), {"target_tokens": float(b)}
        return cosine_similarity_loss(a, p, batch["score"]), {"target_tokens": float(b)}

    @torch.no_grad()
    def _embed_texts(self, model, tokenizer, texts, spec, device) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 16):
            ids, mask = pad([tokenize(tokenizer, t, spec.data.max_length)[0] for t in texts[i : i + 16]], tokenizer.pad_token_id)
            out.append(embed(model, ids.to(device), mask.to(device)).float())
        return torch.cat(out)

    def score_rows(self, model, tokenizer, rows, spec, ctx):
        # Spearman and recall@1 need every held-out pair at once: each rank embeds its shard, all
        # ranks gather all shards, and every row reports the same global value.
        scored = "score" in rows[0]
        a = self._embed_texts(model, tokenizer, [r["sentence1" if scored else "anchor"] for r in rows], spec, ctx.device)
        b = self._embed_texts(model, tokenizer, [r["sentence2" if scored else "positive"] for r in rows], spec, ctx.device)
        hashes = gather_rows(torch.tensor([row_hash(r) for r in rows], dtype=torch.float64, device=a.device)[:, None])[:, 0]
        if scored:
            cos = F.cosine_similarity(a, b, dim=-1).double()
            gold = torch.tensor([r["score"] for r in rows], dtype=torch.float64, device=a.device)
            both = strip_padding(gather_rows(torch.stack([cos, gold], 1)), hashes).cpu()
            value = {"spearman": spearman(both[:, 0].numpy(), both[:, 1].numpy())}
        else:
            a, b = (strip_padding(gather_rows(x), hashes) for x in (a, b))
            sims = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
            value = {"recall_at_1": float((sims.argmax(1) == torch.arange(len(a), device=a.device)).float().mean())}
        return [dict(value) for _ in rows]

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, **scores}

    def save_extra(self, model, tokenizer, folder, spec):
        write_sentence_transformers(folder, model.config.hidden_size, spec.data.max_length)
