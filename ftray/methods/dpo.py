"""dpo: Direct Preference Optimisation on `preference` rows: the policy learns to raise the log-probability
of the chosen reply over the rejected one, relative to a frozen reference (sigmoid = DPO, ipo, hinge;
label smoothing = cDPO). Loss on response tokens only; the prompt (`history` + `prompt`, chat template)
is context.

The reference: under LoRA, the same model with its adapter disabled (`PeftModel.disable_adapter()`, no
second copy in memory); under `full` / `freeze`, a frozen copy of the base made when it is loaded.
Judged on held-out pairs by the implicit reward beta x (log pi - log ref): accuracy (chosen above
rejected; a tie counts half, so the untrained policy scores 0.5), margin, and the policy's
chosen/rejected log-probabilities; beside the accuracy, the length heuristic's and the accuracy on the
length-balanced pairs (`ftray.metrics.length_summary`).
"""

from __future__ import annotations

import torch

from ftray.config import PEFT_KINDS
from ftray.data.encode import IGNORE, ensure_chat_template
from ftray.methods._base import MethodBase
from ftray.methods._enc import pad
from ftray.methods._lm import Reference, labelled_logps, load_causal_lm
from ftray.methods.losses import dpo_loss
from ftray.metrics import length_keys, length_summary

__all__ = ["DPO", "LOSS_TYPES"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_pair(tokenizer, row: dict, max_length: int) -> dict:
    """Prompt ids and the two replies' ids, rendered as `sft` renders a chat (prefix by prefix). When too
    long, the prompt loses its start (down to half of max_length), then the replies their ends."""
    msgs = [*row.get("history", []), {"role": "user", "content": row["prompt"]}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    replies = []
    for reply in (row["chosen"], row["rejected"]):
        full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": reply}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        replies.append(_ids(tokenizer, full[len(prompt) :]))
    p = _ids(tokenizer, prompt)
    longest = max(len(r) for r in replies)
    keep = min(len(p), max(max_length - longest, max_length // 2))
    cut = keep < len(p) or len(p[-keep:]) + longest > max_length
    p = p[len(p) - keep :]
    c, r = (x[: max_length - len(p)] for x in replies)
    return {
        "input_ids": p + c,
        "labels": [IGNORE] * len(p) + c,
        "rejected_ids": p + r,
        "rejected_labels": [IGNORE] * len(p) + r,
        "truncated": cut,
    }


class DPO(MethodBase):
    name = "dpo"
    formats = ("preference",)
    task_type = "CAUSAL_LM"
    packable = False
    scores_carry_loss = True  # a pair's loss and its accuracy come from the same policy and reference forwards

    def __init__(self):
        self.reference = Reference()

    def metrics(self, spec) -> set[str]:
        return {"eval_loss", "reward_accuracy", "reward_margin", "length_heuristic_accuracy", "balanced_accuracy"}

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        from ftray.config import SpecError
        from ftray.models.load import resolve

        if spec.adapter.kind in PEFT_KINDS and resolve(spec.model.path, spec.model.tokenizer).adapter:
            # Disabling a continued adapter would give the bare base, not the model the run starts from.
            raise SpecError(
                f"model.path: {spec.model.path} is an adapter run; dpo with LoRA needs a full model as its "
                "reference: `ftray export RUN --merge` and start from the run's merged/"
            )
        ensure_chat_template(tokenizer)
        try:
            encode_pair(tokenizer, train_rows.rows[0], spec.data.max_length)
        except ValueError as e:
            raise SpecError(f"data.train: {e}") from None

    def load_base(self, path, dtype, spec):
        model = load_causal_lm(path, dtype, spec)
        self.reference.keep(model, spec, path, dtype)
        return model

    def examples(self, row, tokenizer, spec):
        m = spec.method
        return [{**encode_pair(tokenizer, row, spec.data.max_length),
                 # loss() sees only the batch
                 "beta": m.beta, "loss_type": LOSS_TYPES.index(m.loss_type), "label_smoothing": m.label_smoothing}]

    def collate(self, examples, pad_id):
        # Chosen then rejected, in one forward pass (the same number of passes on every rank, as ZeRO-3 needs).
        ids, mask = pad([list(e["input_ids"]) for e in examples] + [list(e["rejected_ids"]) for e in examples], pad_id)
        labels = torch.full_like(ids, IGNORE)
        for i, lab in enumerate([e["labels"] for e in examples] + [e["rejected_labels"] for e in examples]):
            labels[i, : len(lab)] = torch.tensor(list(lab))
        e = examples[0]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "beta": torch.tensor(float(e["beta"])),
            "loss_type": torch.tensor(int(e["loss_type"])),
            "label_smoothing": torch.tensor(float(e["label_smoothing"])),
        }

    def _pair(self, model, batch, reduce: bool = True):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        policy, n = labelled_logps(model, labels, input_ids=ids, attention_mask=mask)
        ref, _ = self.reference.logps(model, labels, input_ids=ids, attention_mask=mask)
        pc, pr = policy.chunk(2)
        rc, rr = ref.chunk(2)
        nc, nr = n.chunk(2)
        loss, chosen_reward, rejected_reward = dpo_loss(
            pc, pr, rc, rr,
            beta=float(batch["beta"]),
            loss_type=LOSS_TYPES[int(batch["loss_type"])],
            label_smoothing=float(batch["label_smoothing"]),
            chosen_tokens=nc, rejected_tokens=nr,
            reduce=reduce,
        )
        return loss, chosen_reward, rejected_reward, pc.detach(), pr.detach()

    def loss(self, model, batch):
        loss, *_ = self._pair(model, batch)
        return loss, {"target_tokens": float(len(batch["input_ids"]) // 2)}

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        out = []
        for i in range(0, len(rows), 16):
            chunk = rows[i : i + 16]
            ex = [e for r in chunk for e in self.examples(r, tokenizer, spec)]
            batch = {k: v.to(ctx.device) for k, v in self.collate(ex, tokenizer.pad_token_id).items()}
            losses, cr, rr, pc, pr = self._pair(model, batch, reduce=False)
            for row, lo, a, b, c, d in zip(chunk, losses.tolist(), cr.tolist(), rr.tolist(), pc.tolist(), pr.tolist(),
                                           strict=True):
                acc = float(a > b) + 0.5 * float(a == b)
                out.append({
                    "loss": lo,
                    "reward_accuracy": acc,
                    "reward_margin": a - b,
                    "chosen_logps": c,
                    "rejected_logps": d,
                    **length_keys(row, acc),
                })
        return out

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, **length_summary(scores, "reward_accuracy")}

