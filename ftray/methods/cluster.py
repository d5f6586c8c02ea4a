"""cluster: group texts into topics without labels. An encoder + mean pooling is trained with an
unsupervised contrastive objective (SimCSE: two dropout views of each text are its positive pair, the
rest of the micro-batch its negatives), then k-means runs on the held-out embeddings.

Rows: `text` (plain text or unlabelled JSONL), or `labels` (text, label), whose labels training never
sees: they only judge the clusters (NMI and ARI against the labels). After each evaluation the clusters,
their sizes and top terms are written to `<output.dir>/clusters.json`.
"""

from __future__ import annotations

import json

import torch

from ftray.methods._base import MethodBase
from ftray.methods._enc import (
    gather_objects,
    gather_rows,
    load_auto,
    pad,
    tokenize,
    write_sentence_transformers,
)
from ftray.methods.losses import info_nce, mean_pool

__all__ = ["Cluster", "top_terms"]


def top_terms(texts: list[str], assign: list[int], k: int, n: int) -> list[list[str]]:
    """Each cluster's most distinctive words: TF-IDF over one document per cluster (its texts joined)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [" ".join(t for t, a in zip(texts, assign, strict=True) if a == c) for c in range(k)]
    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", sublinear_tf=True)
    m = vec.fit_transform(docs).toarray()
    vocab = vec.get_feature_names_out()
    return [[str(vocab[j]) for j in row.argsort()[::-1][:n] if row[j] > 0] for row in m]


class Cluster(MethodBase):
    name = "cluster"
    formats = ("text", "labels")
    task_type = "FEATURE_EXTRACTION"
    packable = False

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "nmi", "ari"}  # nmi/ari: held-out rows with a `label`

    def load_base(self, path, dtype, spec):
        from transformers import AutoModel

        model = load_auto(AutoModel, path, dtype, spec)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # mean pooling reads the last hidden state; an unused pooler would get no gradient
        return model

    def examples(self, row, tokenizer, spec):
        ids, cut = tokenize(tokenizer, row["text"], spec.data.max_length)  # the label (if any) is never used
        return [{"input_ids": ids, "temperature": spec.method.temperature, "truncated": cut}]

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        # The batch twice, in one forward pass: dropout makes the two copies two views (SimCSE).
        return {
            "input_ids": torch.cat([ids, ids]),
            "attention_mask": torch.cat([mask, mask]),
            "temperature": torch.tensor(float(examples[0].get("temperature") or 0.05)),
        }

    def loss(self, model, batch):
        z = mean_pool(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state, batch["attention_mask"])
        b = len(z) // 2
        return info_nce(z[:b], z[b:], None, float(batch["temperature"])), {"target_tokens": float(b)}

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        from sklearn.cluster import KMeans
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        out = []
        for i in range(0, len(rows), 16):
            ids, mask = pad([tokenize(tokenizer, r["text"], spec.data.max_length)[0] for r in rows[i : i + 16]], tokenizer.pad_token_id)
            ids, mask = ids.to(ctx.device), mask.to(ctx.device)
            out.append(mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask).float())
        emb = torch.nn.functional.normalize(gather_rows(torch.cat(out)), dim=-1).cpu().numpy()
        everything = gather_objects(rows)  # the loop's padding copies of row 0 dropped
        emb = emb[: len(everything)]
        labels = [r.get("label") for r in everything]
        k = spec.method.n_clusters or (len(set(labels)) if all(lab is not None for lab in labels) else 8)
        assign = KMeans(n_clusters=k, n_init=10, random_state=spec.train.seed).fit_predict(emb).tolist()
        scores = {}
        if all(lab is not None for lab in labels):
            scores = {
                "nmi": float(normalized_mutual_info_score(labels, assign)),
                "ari": float(adjusted_rand_score(labels, assign)),
            }
        self._write_clusters(spec, everything, assign, k, scores)
        return [dict(scores) for _ in rows]

    def _write_clusters(self, spec, rows, assign, k, scores) -> None:
        import torch.distributed as dist

        from ftray import storage

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        terms = top_terms([r["text"] for r in rows], assign, k, spec.method.top_terms)
        clusters = []
        for c in range(k):
            members = [r for r, a in zip(rows, assign, strict=True) if a == c]
            entry = {"cluster": c, "size": len(members), "top_terms": terms[c], "examples": [m["text"][:200] for m in members[:3]]}
            if members and all("label" in m for m in members):
                counts: dict = {}
                for m in members:
                    counts[m["label"]] = counts.get(m["label"], 0) + 1
                entry["labels"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
            clusters.append(entry)
        storage.write_text_atomic(
            storage.join(spec.output.dir, "clusters.json"), json.dumps({"k": k, **scores, "clusters": clusters}, indent=1)
        )

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, **scores}

    def save_extra(self, model, tokenizer, folder, spec):
        write_sentence_transformers(folder, model.config.hidden_size, spec.data.max_length)
