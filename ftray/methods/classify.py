"""classify: a sequence-classification head on a pre-trained encoder or decoder, trained with the base
frozen (`adapter.kind: freeze`), adapted (`lora`) or fully tuned (`full`). Rows: `labels` (text, label).

Label names come from `method.labels` or the sorted label set of `data.train`; they become the saved
model's `id2label`, so `AutoModelForSequenceClassification.from_pretrained` gives named predictions.
Judged by accuracy and macro-F1 on the held-out rows.

`method.pooling: mean` keeps the transformers class and its linear head (BERT's `classifier`) but feeds it the
masked mean of the last hidden state instead of the pooler's [CLS] vector: on a frozen sentence-transformers
encoder that is the vector the encoder was trained to produce (BERT's pooler there is an untrained leftover),
so a frozen-base head reaches what logistic regression on the same embeddings reaches. The saved files are the
usual ones; the pooling lives in run.json's spec, which `load_base` reads (training, `ftray eval`, merging and
serving all load a run through it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ftray.methods._base import MethodBase
from ftray.methods._enc import load_auto, pad, tokenize
from ftray.methods.losses import mean_pool
from ftray.metrics import confusion_keys, macro_f1_from_confusion

__all__ = ["Classify", "label_names"]


def _sorted_labels(labels: set[str]) -> list[str]:
    # "2" < "10": integer labels sort as numbers.
    return sorted(labels, key=int) if all(s.lstrip("-").isdigit() for s in labels) else sorted(labels)


@functools.lru_cache(maxsize=8)
def _train_labels(path: str, on_bad_rows: str) -> tuple[str, ...]:
    from ftray.data.rows import read_checked

    return tuple(_sorted_labels({r["label"] for r in read_checked(path, "labels", on_bad_rows).rows}))


def label_names(spec) -> list[str]:
    return list(spec.method.labels or _train_labels(spec.data.train, spec.data.on_bad_rows))


def _mean_head(model):
    """(encoder, dropout or None, linear head) of a transformers sequence classifier under a DeepSpeed engine
    and/or peft (whose `modules_to_save` wrapper of the head calls the trained copy)."""
    net = getattr(model, "module", model)
    net = net.get_base_model() if hasattr(net, "get_base_model") else net
    head = next((m for n, m in net.named_children() if n in ("classifier", "score")), None)
    hidden = net.config.hidden_size
    linear = getattr(head, "original_module", head)  # peft's ModulesToSaveWrapper
    if not isinstance(linear, torch.nn.Linear) or linear.in_features != hidden:
        from ftray.config import SpecError

        raise SpecError(f"method.pooling: mean needs a head that is one linear layer on the hidden state (BERT's "
                        f"`classifier`, a decoder's `score`); {type(net).__name__}'s is {type(linear).__name__}")
    drop = net.dropout if isinstance(getattr(net, "dropout", None), torch.nn.Dropout) else None
    return net.base_model, drop, head


class Classify(MethodBase):
    name = "classify"
    formats = ("labels",)
    task_type = "SEQ_CLS"
    packable = False

    def __init__(self):
        self.pooling = "model"  # `method.pooling`, set by load_base: every path to a classify model passes there

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "accuracy", "macro_f1"}

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        from ftray.config import SpecError

        names = label_names(spec)
        train = {r["label"] for r in train_rows.rows}
        if spec.method.labels and not train <= set(names):
            raise SpecError(f"data.train: labels {sorted(train - set(names))} are not in `method.labels`")
        if eval_rows is not None:
            held = {r["label"] for r in eval_rows.rows}
            if held != train:
                raise SpecError(
                    f"data.eval: its label set differs from data.train's (only in eval: {sorted(held - train)}, "
                    f"only in train: {sorted(train - held)})"
                )

    def recorded(self, spec) -> dict:
        return {} if spec.method.labels else {"labels": label_names(spec)}

    def with_recorded(self, spec, record: dict):
        if spec.method.labels or not record.get("labels"):
            return spec
        return spec.model_copy(update={"method": spec.method.model_copy(update={"labels": list(record["labels"])})})

    def load_base(self, path, dtype, spec):
        from transformers import AutoModelForSequenceClassification

        from ftray.models.load import load_tokenizer

        names = label_names(spec)
        model = load_auto(
            AutoModelForSequenceClassification,
            path,
            dtype,
            spec,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )
        if model.config.pad_token_id is None:  # decoder heads read the last non-pad token
            model.config.pad_token_id = load_tokenizer(spec.model.tokenizer or path).pad_token_id
        self.pooling = spec.method.pooling
        if self.pooling == "mean":
            _mean_head(model)  # refuses a head that cannot read the mean, before any step
        return model

    def logits(self, model, input_ids, attention_mask):
        if self.pooling == "model":
            return model(input_ids=input_ids, attention_mask=attention_mask).logits
        encoder, drop, head = _mean_head(model)
        pooled = mean_pool(encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)
        return head(drop(pooled) if drop is not None else pooled)

    def examples(self, row, tokenizer, spec):
        names = label_names(spec)
        if row["label"] not in names:
            raise ValueError(f"label {row['label']!r} is not one of the training labels {names}")
        ids, cut = tokenize(tokenizer, row["text"], spec.data.max_length)
        return [{"input_ids": ids, "label": names.index(row["label"]), "truncated": cut}]

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "label": torch.tensor([int(e["label"]) for e in examples])}

    def loss(self, model, batch):
        logits = self.logits(model, batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["label"]), {"target_tokens": float(len(batch["label"]))}

    @torch.no_grad()
    def predict(self, model, tokenizer, texts: list[str], spec, device="cpu") -> list[int]:
        preds = []
        for i in range(0, len(texts), 16):
            ids, mask = pad([tokenize(tokenizer, t, spec.data.max_length)[0] for t in texts[i : i + 16]], tokenizer.pad_token_id)
            logits = self.logits(model, ids.to(device), mask.to(device))
            preds += logits.argmax(-1).tolist()
        return preds

    def score_rows(self, model, tokenizer, rows, spec, ctx):
        names = label_names(spec)
        preds = self.predict(model, tokenizer, [r["text"] for r in rows], spec, ctx.device)
        out = []
        for r, p in zip(rows, preds, strict=True):
            t = names.index(r["label"])  # `check` made sure the eval labels are the training labels
            out.append({"accuracy": float(t == p), **confusion_keys(t, p, len(names))})
        return out

    def summarize(self, eval_loss, scores):
        out = {"eval_loss": eval_loss}
        if "accuracy" in scores:
            out.update(accuracy=scores["accuracy"], macro_f1=macro_f1_from_confusion(scores))
        return out

    def save_extra(self, model, tokenizer, folder, spec):
        return None  # id2label/label2id are in config.json already
