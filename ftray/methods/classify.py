"""classify: a sequence-classification head on a pre-trained encoder or decoder, trained with the base
frozen (`adapter.kind: freeze`), adapted (`lora`) or fully tuned (`full`). Rows: `labels` (text, label).

Label names come from `method.labels` or the sorted label set of `data.train`; they become the saved
model's `id2label`, so `AutoModelForSequenceClassification.from_pretrained` gives named predictions.
Judged by accuracy and macro-F1 on the held-out rows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ftray.methods._base import MethodBase
from ftray.methods._enc import load_auto, pad, tokenize
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


class Classify(MethodBase):
    name = "classify"
    formats = ("labels",)
    task_type = "SEQ_CLS"
    packable = False

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
        return model

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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["label"]), {"target_tokens": float(len(batch["label"]))}

    @torch.no_grad()
    def predict(self, model, tokenizer, texts: list[str], spec, device="cpu") -> list[int]:
        preds = []
        for i in range(0, len(texts), 16):
            ids, mask = pad([tokenize(tokenizer, t, spec.data.max_length)[0] for t in texts[i : i + 16]], tokenizer.pad_token_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
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
