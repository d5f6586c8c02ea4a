"""cluster: group texts into topics without labels. An encoder + mean pooling is trained with an
unsupervised contrastive objective (SimCSE: two dropout views of each text are its positive pair, the
rest of the micro-batch its negatives; `method.contrastive_weight`) and/or DEC's clustering loss
(`method.cluster_weight`: each text pulled towards the centre it already leans to, the centres k-means
over the last `cluster_memory` training embeddings of every rank, refreshed every `refresh_every` steps;
SCCL, Zhang et al. 2021, is the two together), then k-means runs on the held-out embeddings.

Rows: `text` (plain text or unlabelled JSONL), or `labels` (text, label), whose labels training never
sees: they only judge the clusters (NMI and ARI against the labels). After each evaluation the clusters,
their sizes and top terms are written to `<output.dir>/clusters.json`.
"""

from __future__ import annotations

import json

import torch

from ftray.methods._base import MethodBase
from ftray.methods._enc import (
    all_gather_with_grad,
    gather_objects,
    gather_rows,
    load_auto,
    pad,
    tokenize,
    write_sentence_transformers,
)
from ftray.methods.losses import dec_loss, info_nce, mean_pool

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

    def __init__(self) -> None:
        # DEC's state on a training worker (`setup`), the same on every rank: the centres, the memory of
        # recent training embeddings they are fitted on, and the training micro-batches seen.
        self._dec: dict | None = None
        self._centres: torch.Tensor | None = None
        self._memory: torch.Tensor | None = None
        self._calls = 0

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "nmi", "ari"}  # nmi/ari: held-out rows with a `label`

    def setup(self, spec, tokenizer, ctx) -> None:
        import torch.distributed as dist

        m = spec.method
        if m.cluster_weight > 0:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            per_step = max(1, spec.train.global_batch_size // (spec.train.micro_batch_size * world))
            self._dec = {"k": m.n_clusters, "memory": m.cluster_memory, "refresh": m.refresh_every * per_step, "seed": spec.train.seed}

    def state_dict(self) -> dict | None:
        if self._dec is None:
            return None
        return {
            "calls": self._calls,
            "centres": None if self._centres is None else self._centres.tolist(),
            "memory": None if self._memory is None else self._memory.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])
        self._centres = None if state["centres"] is None else torch.tensor(state["centres"], dtype=torch.float32)
        self._memory = None if state["memory"] is None else torch.tensor(state["memory"], dtype=torch.float32)

    def _remember(self, z: torch.Tensor) -> None:
        """A training micro-batch's unit embeddings (every rank's) into the memory; the centres refitted
        (k-means, fixed seed, rank 0's sent to all) before the first DEC term and every `refresh` micro-batches."""
        import torch.distributed as dist
        from sklearn.cluster import KMeans

        d = self._dec
        everything = all_gather_with_grad(z.detach().float())[0].cpu()
        self._memory = everything if self._memory is None else torch.cat([self._memory, everything])[-d["memory"] :]
        if (self._centres is None and len(self._memory) >= d["k"]) or self._calls % d["refresh"] == 0:
            km = KMeans(n_clusters=d["k"], n_init=3, random_state=d["seed"]).fit(self._memory.numpy())
            centres = torch.nn.functional.normalize(torch.tensor(km.cluster_centers_, dtype=torch.float32), dim=-1)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                centres = centres.to(z.device)
                dist.broadcast(centres, src=0)  # the same centres on every rank, whatever each one's BLAS did
                centres = centres.cpu()
            self._centres = centres

    def load_base(self, path, dtype, spec):
        from transformers import AutoModel

        model = load_auto(AutoModel, path, dtype, spec)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # mean pooling reads the last hidden state; an unused pooler would get no gradient
        return model

    def examples(self, row, tokenizer, spec):
        ids, cut = tokenize(tokenizer, row["text"], spec.data.max_length)  # the label (if any) is never used
        m = spec.method
        weights = {"contrastive_weight": m.contrastive_weight, "cluster_weight": m.cluster_weight, "cluster_temperature": m.cluster_temperature}
        return [{"input_ids": ids, "temperature": m.temperature, **weights, "truncated": cut}]

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        e = examples[0]
        contrastive = float(e.get("contrastive_weight", 1.0))
        # SimCSE: the batch twice, in one forward pass: dropout makes the two copies two views.
        views = 2 if contrastive > 0 else 1
        return {
            "input_ids": torch.cat([ids] * views),
            "attention_mask": torch.cat([mask] * views),
            "temperature": torch.tensor(float(e.get("temperature") or 0.05)),
            "contrastive_weight": torch.tensor(contrastive),
            "cluster_weight": torch.tensor(float(e.get("cluster_weight", 0.0))),
            "cluster_temperature": torch.tensor(float(e.get("cluster_temperature", 0.1))),
        }

    def loss(self, model, batch):
        z = mean_pool(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state, batch["attention_mask"])
        contrastive, clustering = float(batch["contrastive_weight"]), float(batch["cluster_weight"])
        b = len(z) // (2 if contrastive > 0 else 1)
        loss = z.sum() * 0.0  # a graph through the model on every rank, even before DEC's first centres
        if contrastive > 0:
            loss = loss + contrastive * info_nce(z[:b], z[b:], None, float(batch["temperature"]))
        if clustering > 0:
            unit = torch.nn.functional.normalize(z[:b].float(), dim=-1)
            if self._dec is not None and getattr(model, "module", model).training:  # a training step, not the held-out loss
                self._calls += 1
                self._remember(unit)
            if self._centres is not None:  # none yet (or no `setup`: `ftray eval`): the term is left out
                loss = loss + clustering * dec_loss(unit, self._centres.to(unit.device), float(batch["cluster_temperature"]))
        return loss, {"target_tokens": float(b)}

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
