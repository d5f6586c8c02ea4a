"""seq2seq: translation (or any text-to-text task) on parallel pairs with an encoder-decoder (T5, BART).

Rows: `translation` (source, target); `method.source_prefix` is put before every source (T5's
"translate English to French: "). The loss is the cross-entropy of the target tokens (the model shifts
them right for its decoder). Judged by corpus BLEU and chrF (sacrebleu) of greedy translations of the
held-out sources, gathered from every rank. A fully saved model loads with AutoModelForSeq2SeqLM.
"""

from __future__ import annotations

import math

import torch

from ftray.data.encode import IGNORE
from ftray.methods._base import MethodBase
from ftray.methods._enc import gather_objects, load_auto, pad
from ftray.methods.losses import masked_token_cross_entropy
from ftray.progress import bar

__all__ = ["Seq2Seq"]


class Seq2Seq(MethodBase):
    name = "seq2seq"
    formats = ("translation",)
    task_type = "SEQ_2_SEQ_LM"
    packable = False

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "perplexity", "bleu", "chrf"}

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        from ftray.models.load import ModelError

        if not getattr(config, "is_encoder_decoder", False):
            raise ModelError(
                f"model.path: {spec.model.path}: a decoder-only `{config.model_type}` model; seq2seq needs an "
                "encoder-decoder (T5, BART, ...); use `method.kind: sft` for a decoder-only model"
            )

    def load_base(self, path, dtype, spec):
        from transformers import AutoModelForSeq2SeqLM

        return load_auto(AutoModelForSeq2SeqLM, path, dtype, spec)

    def examples(self, row, tokenizer, spec):
        n = spec.data.max_length
        src = tokenizer(spec.method.source_prefix + row["source"])["input_ids"]
        tgt = tokenizer(text_target=row["target"])["input_ids"]
        if tokenizer.eos_token_id is not None and tgt[-1:] != [tokenizer.eos_token_id]:
            tgt = tgt + [tokenizer.eos_token_id]  # T5/BART tokenizers end with </s>; others must learn to stop too
        return [{"input_ids": src[:n], "labels": tgt[:n], "truncated": len(src) > n or len(tgt) > n}]

    def collate(self, examples, pad_id):
        ids, mask = pad([e["input_ids"] for e in examples], pad_id)
        lab, lab_mask = pad([e["labels"] for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab.masked_fill(lab_mask == 0, IGNORE)}

    def loss(self, model, batch):
        # Given labels, the model builds its decoder inputs (labels shifted right); its logits at t predict labels[t].
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
        loss, n = masked_token_cross_entropy(logits, batch["labels"])
        return loss, {"target_tokens": float(n)}

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        import sacrebleu

        hyps = []
        for i in bar(range(0, len(rows), 16), "generate", unit="batch"):
            chunk = rows[i : i + 16]
            ids, mask = pad(
                [tokenizer(spec.method.source_prefix + r["source"])["input_ids"][: spec.data.max_length] for r in chunk],
                tokenizer.pad_token_id,
            )
            out = model.generate(
                input_ids=ids.to(ctx.device),
                attention_mask=mask.to(ctx.device),
                max_new_tokens=spec.method.max_new_tokens,
                do_sample=False,
                num_beams=1,
                synced_gpus=ctx.synced_gpus,
            )
            hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
        # BLEU and chrF are corpus statistics: every rank scores all held-out rows, and each row reports them.
        pairs = gather_objects([[h.strip(), r["target"]] for h, r in zip(hyps, rows, strict=True)])
        hyp, ref = [p[0] for p in pairs], [p[1] for p in pairs]
        value = {"bleu": sacrebleu.corpus_bleu(hyp, [ref]).score, "chrf": sacrebleu.corpus_chrf(hyp, [ref]).score}
        return [dict(value) for _ in rows]

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0)), **scores}

