"""What grpo and ppo share, as functions and one object they each hold (composition, not a parent class):
the prompt rows and batches, the checks before Ray, and the `Sampler`, which turns a batch of prompts into
a `Rollout` (completions sampled from the current policy, decoded and rewarded) and judges held-out
prompts by greedy decoding.

The rollout is a step of its own, before the loss (as TRL's `_generate_and_score_completions` before
`compute_loss`): the loop calls the method's `prepare(model, batch)` on a training micro-batch, which
returns the batch with its `Rollout`; the loss reads it. The held-out loss never samples: it is the NLL of
the reference answers (`reference_answer_nll`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ftray.config import PEFT_KINDS
from ftray.data.encode import IGNORE, render_prompt
from ftray.methods._enc import pad
from ftray.methods._lm import lm_loss
from ftray.methods.losses import masked_mean, token_logps
from ftray.progress import bar

__all__ = ["FORMATS", "PromptRows", "Rollout", "Sampler", "check_rollout_job", "collate_prompts", "completion_logps", "completion_mask",
           "prompt_examples", "reference_answer_nll", "rollout_info", "rollout_metrics", "served_reward_model"]

FORMATS = ("prompt_completion", "instruction", "chat")


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
    return ids, mask


def completion_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each sampled completion, 0 after it."""
    is_eos = tokens == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after).long()


@dataclass
class Rollout:
    full: torch.Tensor  # prompt (left-padded) + sampled completion
    attn: torch.Tensor
    pos: torch.Tensor
    comp: torch.Tensor  # the completion tokens
    c_mask: torch.Tensor  # 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the completion has an EOS (not cut by max_new_tokens)
    prompt_len: int
    rewards: torch.Tensor  # one per completion
    info: dict  # generate_s, score_s and per-source reward means

    @property
    def keep(self) -> int:
        """`logits_to_keep` for a forward over `full`: the positions that predict the completion, and the last (the
        prompt's positions get no vocabulary-wide logits)."""
        return self.comp.shape[1] + 1


# ------------------------------------------------------------------ rows, batches, checks (no model)
def prompt_examples(row, tokenizer, spec) -> list[dict]:
    """The prompt (cut from its start to leave room for `max_new_tokens`) and its reference answer."""
    prompt, reference = render_prompt(tokenizer, row)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = spec.data.max_length - spec.method.max_new_tokens
    cut = len(p) > room
    p = p[-room:] if room > 0 else []
    if not p:
        return [{"input_ids": [], "labels": [], "prompt_len": 0, "truncated": True}]
    ids = (p + r)[: spec.data.max_length]
    return [{"input_ids": ids, "labels": [IGNORE] * len(p) + ids[len(p) :], "prompt_len": len(p), "truncated": cut}]


def collate_prompts(examples, pad_id) -> dict[str, torch.Tensor]:
    ids, mask = pad([list(e["input_ids"]) for e in examples], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        labels[i, : len(e["labels"])] = torch.tensor(list(e["labels"]))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_len": torch.tensor([int(e["prompt_len"]) for e in examples]),
    }


def check_rollout_job(spec, samples: int, kl: float) -> None:
    """Before Ray: `samples` completions per prompt, a KL weight `kl` to the reference."""
    from ftray.config import SpecError
    from ftray.models.load import ModelError, resolve

    m = spec.method
    if spec.adapter.kind in PEFT_KINDS and kl > 0 and resolve(spec.model.path, spec.model.tokenizer).adapter:
        raise SpecError(
            f"model.path: {spec.model.path} is an adapter run; {m.kind} with LoRA and a KL penalty needs a full "
            "model as its reference: `ftray export RUN --merge` and start from the run's merged/"
        )
    if spec.train.micro_batch_size * samples > 512:
        raise SpecError(f"train.micro_batch_size x the samples per prompt: {spec.train.micro_batch_size * samples} "
                        "sequences per rollout (at most 512)")
    rm = m.reward_model
    if rm is not None and rm.path is not None:
        try:
            r = resolve(rm.path, None, "method.reward_model.path")
        except ModelError as e:
            raise SpecError(str(e)) from None
        if r.adapter:
            raise SpecError(f"method.reward_model.path: {rm.path} is an adapter run; serve its merged/ model")


def served_reward_model(spec):
    """`Method.reward_model`: the job's `method.reward_model` (None: verifiable rewards only)."""
    return spec.method.reward_model


def rollout_metrics(spec) -> set[str]:
    out = {"eval_loss"}
    if spec.method.exact_match or spec.method.reward_model is not None:  # held-out prompts are generated
        out |= {"exact_match", "numeric_match", "reward"}  # reward: the job's own reward of each completion
        if spec.method.reward_model is not None:
            out.add("reward_model_score")
    return out


class PromptRows:
    """What a rollout method reads and reports, the same for grpo and ppo: prompt rows and their batches,
    the metrics, the served reward model. Pure declarations (no hook, no state, nothing that knows which
    method it is part of); the rollout itself is the `Sampler` each method holds."""

    formats = FORMATS
    task_type = "CAUSAL_LM"
    packable = False
    examples = staticmethod(prompt_examples)
    collate = staticmethod(collate_prompts)
    metrics = staticmethod(rollout_metrics)
    reward_model = staticmethod(served_reward_model)

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, **scores}


# ------------------------------------------------------------------ losses' shared parts
def reference_answer_nll(model, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """The held-out loss of a rollout method: the NLL of the reference answers (no sampling)."""
    return lm_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})


def completion_logps(logits: torch.Tensor, r: Rollout, temperature: float) -> torch.Tensor:
    """Per-token log-probs (B, T) of the rollout's completions from the logits of `r.full`, under the distribution
    they were sampled from: logits / `temperature` (as TRL), for the policy and the reference alike. `logits` may
    cover every position of `r.full` or only its last `r.keep` (the forward's `logits_to_keep`)."""
    return token_logps(logits[:, logits.shape[1] - r.keep : -1] / temperature, r.comp)


def rollout_info(r: Rollout, scores: torch.Tensor, clipped: torch.Tensor, kl: float) -> dict[str, float]:
    """What every rollout step logs (the loop's `train/<key>`)."""
    return {
        "target_tokens": float(len(r.comp)),
        "reward_mean": float(scores.mean()),
        "reward_min": float(scores.min()),
        "reward_max": float(scores.max()),
        "kl": kl,
        "completion_len": float(r.c_mask.sum(-1).float().mean()),
        "truncated": float((~r.ended).float().mean()),  # cut by max_new_tokens (TRL's completions/clipped_ratio)
        "clipped": float(masked_mean(clipped, r.c_mask)),
        **r.info,
    }


# ------------------------------------------------------------------ sampling and scoring (a model)
def turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant reply (SmolLM2: `<|im_end|>` and a newline)."""
    mark = "\x00reply\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": mark}], tokenize=False)
    return text.split(mark, 1)[1]


class Sampler:
    """Samples completions from the policy and rewards them; made by the method's `setup` on each worker
    (with the served reward model's scorer in `ctx.reward_model`), or for an evaluation alone (no reward).

    What the served reward model scores is what a `reward` run trained on (`ftray.methods.reward.render`): for
    `chat` rows the conversation as the policy saw it, rendered by the chat template (special tokens kept), the
    sampled reply and the template's end of turn, sent as one rendered string; for the other formats
    {"prompt", "response"}, which the scorer renders as a user turn and an assistant turn."""

    def __init__(self, spec, tokenizer, synced_gpus: bool = False, reward=None):
        self.spec, self.tokenizer, self.synced_gpus, self.reward = spec, tokenizer, synced_gpus, reward
        self.turn_end = turn_end(tokenizer) if spec.data.format == "chat" else None

    def _texts(self, batch) -> tuple[list[list[int]], list[str]]:
        tok = self.tokenizer
        prompts, refs = [], []
        for ids, lab, n in zip(batch["input_ids"], batch["labels"], batch["prompt_len"].tolist(), strict=True):
            prompts.append(ids[:n].tolist())
            refs.append(tok.decode([t for t in lab.tolist() if t != IGNORE], skip_special_tokens=True))
        return prompts, refs

    def served_items(self, prompts: list[list[int]], texts: list[str], n: int = 1) -> list | None:
        """The served reward model's input for each completion (`n` per prompt, in order); None without one."""
        if self.reward is None or self.reward.served is None:
            return None
        tok = self.tokenizer
        if self.turn_end is not None:
            rendered = [tok.decode(p, skip_special_tokens=False) for p in prompts]
            return [rendered[i // n] + t + self.turn_end for i, t in enumerate(texts)]
        raw = [tok.decode(p, skip_special_tokens=True) for p in prompts]
        return [{"prompt": raw[i // n], "response": t} for i, t in enumerate(texts)]

    @torch.no_grad()
    def generate(self, net, prompts: list[list[int]], device, sample: bool, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, tok = self.spec.method, self.tokenizer
        ids, mask = left_pad(prompts, tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        was = net.training
        net.eval()
        try:
            kw = {"do_sample": True, "temperature": m.temperature, "top_p": m.top_p} if sample else {"do_sample": False}
            out = net.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=m.max_new_tokens,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                synced_gpus=self.synced_gpus,
                **kw,
            )
        finally:
            net.train(was)
        comp = out[:, ids.shape[1] :]
        return ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), comp

    def _decode(self, comp: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        tok = self.tokenizer
        c_mask = completion_mask(comp, tok.eos_token_id)
        return c_mask, tok.batch_decode(comp.masked_fill(c_mask == 0, tok.pad_token_id), skip_special_tokens=True)

    def rollout(self, model, batch, n: int) -> Rollout:
        """Sample `n` completions per prompt of the batch, decode and reward them."""
        net = getattr(model, "module", model)  # generate on the module (a DeepSpeed engine has no generate)
        device = batch["input_ids"].device
        prompts, refs = self._texts(batch)
        t0 = time.time()
        p_ids, p_mask, comp = self.generate(net, prompts, device, sample=True, n=n)
        gen_s = time.time() - t0
        c_mask, texts = self._decode(comp)
        rewards, parts = self.reward(texts, [r for r in refs for _ in range(n)], self.served_items(prompts, texts, n))
        attn = torch.cat([p_mask, c_mask], dim=1)
        return Rollout(
            full=torch.cat([p_ids, comp], dim=1), attn=attn, pos=(attn.cumsum(-1) - 1).clamp(min=0),
            comp=comp, c_mask=c_mask, ended=(comp == self.tokenizer.eos_token_id).any(-1), prompt_len=p_ids.shape[1],
            rewards=torch.tensor(rewards, dtype=torch.float32, device=device),
            info={"generate_s": gen_s, **{k.replace("/", "_"): v for k, v in parts.items()}},
        )

    @torch.no_grad()
    def score_rows(self, model, rows, device) -> list[dict[str, float]]:
        """Held-out prompts by greedy decoding: exact and numeric match, and the job's reward (and the served
        reward model's score) when the sampler has a reward."""
        from ftray.rlhf.rewards import verifiable_rewards

        tok, spec = self.tokenizer, self.spec
        out = []
        for i in bar(range(0, len(rows), 16), "generate", unit="batch"):
            chunk = rows[i : i + 16]
            ex = [prompt_examples(r, tok, spec)[0] for r in chunk]
            prompts = [list(e["input_ids"][: e["prompt_len"]]) or [tok.eos_token_id] for e in ex]
            _, _, comp = self.generate(model, prompts, device, sample=False, n=1)
            _, texts = self._decode(comp)
            refs = [render_prompt(tok, r)[1] for r in chunk]
            checks = {"exact_match": 1.0, "numeric_match": 1.0}
            scores = [verifiable_rewards(t, r, checks) for t, r in zip(texts, refs, strict=True)]
            if self.reward is not None:
                totals, _ = self.reward(texts, refs, self.served_items(prompts, texts))
                for j, (s, tot) in enumerate(zip(scores, totals, strict=True)):
                    s["reward"] = tot
                    if self.reward.last_served:
                        s["reward_model_score"] = self.reward.last_served[j]
            out += scores
        return out
