"""grpo: Group Relative Policy Optimisation. For each prompt, G completions are sampled from the current
policy; each is rewarded (verifiable functions of the completion and the row's reference answer, and/or a
served reward model); advantages are the rewards relative to their group (minus the group mean, over its
standard deviation); the loss is PPO's clipped surrogate on the completion tokens plus beta x the k3 KL
estimate to a frozen reference (DeepSeekMath, as TRL's GRPOTrainer with one update per rollout), made one
number as `method.loss_type` says (`grpo`, `dapo`, `dr_grpo`: `losses.aggregate_token_loss`).

Rows: `prompt_completion` / `instruction` / `chat`; the completion (last assistant turn) is the reference
answer the verifiable rewards check (`data.columns` maps other names, e.g. GSM8K's `question` and
`final_answer`). The reference policy: under LoRA the model with its adapter disabled, otherwise a frozen
copy (as in `dpo`). Logged every step: reward mean/min/max (and per source), KL, completion length, clipped
share, and seconds spent generating and scoring (the rest of the step is learning).

Judged on held-out prompts by greedy decoding: exact match, numeric match, mean verifiable reward, and the
served reward model's mean score when there is one; eval_loss is the reference answer's NLL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ftray.config import PEFT_KINDS
from ftray.data.encode import IGNORE, render_prompt
from ftray.methods._base import MethodBase
from ftray.methods._enc import pad
from ftray.methods.dpo import DPO, reference_logits_of
from ftray.methods.losses import (
    aggregate_token_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    masked_mean,
    token_cross_entropy,
    token_logps,
)

__all__ = ["GRPO"]


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s) :] = torch.tensor(s)
            mask[i, n - len(s) :] = 1
    return ids, mask


@dataclass
class Rollout:
    full: torch.Tensor  # prompt (left-padded) + sampled completion
    attn: torch.Tensor
    pos: torch.Tensor
    comp: torch.Tensor  # the completion tokens
    c_mask: torch.Tensor  # 1 up to and including the first EOS
    prompt_len: int
    rewards: torch.Tensor  # one per completion
    info: dict  # generate_s, score_s and per-source reward means


def completion_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each sampled completion, 0 after it."""
    is_eos = tokens == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after).long()


class GRPO(MethodBase):
    name = "grpo"
    formats = ("prompt_completion", "instruction", "chat")
    task_type = "CAUSAL_LM"
    packable = False

    def metrics(self, spec) -> set[str]:
        out = {"eval_loss"}
        if spec.method.exact_match or spec.method.reward_model is not None:  # held-out prompts are generated
            out |= {"exact_match", "numeric_match", "reward"}  # reward: the job's own reward of each completion
            if spec.method.reward_model is not None:
                out.add("reward_model_score")
        return out

    def __init__(self):
        self.tokenizer = None
        self.reward = None
        self.spec = None
        self.synced_gpus = False

    # -------------------------------------------------------------- before Ray / on the driver
    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        from ftray.config import SpecError
        from ftray.models.load import ModelError, resolve

        m = spec.method
        n, kl = (m.group_size, m.beta) if m.kind == "grpo" else (m.samples_per_prompt, m.kl_coef)
        if spec.adapter.kind in PEFT_KINDS and kl > 0 and resolve(spec.model.path, spec.model.tokenizer).adapter:
            raise SpecError(
                f"model.path: {spec.model.path} is an adapter run; {m.kind} with LoRA and a KL penalty needs a full "
                "model as its reference: `ftray export RUN --merge` and start from the run's merged/"
            )
        if spec.train.micro_batch_size * n > 512:
            raise SpecError(f"train.micro_batch_size x the samples per prompt: {spec.train.micro_batch_size * n} "
                            "sequences per rollout (at most 512)")
        rm = spec.method.reward_model
        if rm is not None and rm.path is not None:
            try:
                r = resolve(rm.path, None, "method.reward_model.path")
            except ModelError as e:
                raise SpecError(str(e)) from None
            if r.adapter:
                raise SpecError(f"method.reward_model.path: {rm.path} is an adapter run; serve its merged/ model")

    def reward_model(self, spec):
        return spec.method.reward_model

    # -------------------------------------------------------------- on each worker
    def setup(self, spec, tokenizer, ctx) -> None:
        from ftray.rlhf import build_reward

        self.spec, self.tokenizer, self.synced_gpus = spec, tokenizer, ctx.synced_gpus
        self.reward = build_reward(spec.method, ctx.reward_model)

    def load_base(self, path, dtype, spec):
        return DPO().load_base(path, dtype, spec)  # the policy, plus a frozen reference copy unless LoRA

    def examples(self, row, tokenizer, spec):
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

    def collate(self, examples, pad_id):
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

    def _texts(self, batch) -> tuple[list[list[int]], list[str], list[str]]:
        tok = self.tokenizer
        prompts, refs, raw = [], [], []
        for ids, lab, n in zip(batch["input_ids"], batch["labels"], batch["prompt_len"].tolist(), strict=True):
            prompts.append(ids[:n].tolist())
            refs.append(tok.decode([t for t in lab.tolist() if t != IGNORE], skip_special_tokens=True))
            raw.append(tok.decode(ids[:n].tolist(), skip_special_tokens=True))
        return prompts, refs, raw

    @torch.no_grad()
    def _generate(self, net, prompts: list[list[int]], device, sample: bool, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, tok = self.spec.method, self.tokenizer
        ids, mask = _left_pad(prompts, tok.pad_token_id)
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

    def _rollout(self, net, batch, n: int) -> Rollout:
        """Sample `n` completions per prompt of the batch, decode and reward them."""
        tok = self.tokenizer
        device = batch["input_ids"].device
        prompts, refs, raw = self._texts(batch)
        t0 = time.time()
        p_ids, p_mask, comp = self._generate(net, prompts, device, sample=True, n=n)
        gen_s = time.time() - t0
        c_mask = completion_mask(comp, tok.eos_token_id)
        texts = tok.batch_decode(comp.masked_fill(c_mask == 0, tok.pad_token_id), skip_special_tokens=True)
        rewards, parts = self.reward([x for x in raw for _ in range(n)], texts, [r for r in refs for _ in range(n)])
        attn = torch.cat([p_mask, c_mask], dim=1)
        return Rollout(
            full=torch.cat([p_ids, comp], dim=1), attn=attn, pos=(attn.cumsum(-1) - 1).clamp(min=0),
            comp=comp, c_mask=c_mask, prompt_len=p_ids.shape[1],
            rewards=torch.tensor(rewards, dtype=torch.float32, device=device),
            info={"generate_s": gen_s, **{k.replace("/", "_"): v for k, v in parts.items()}},
        )

    def loss(self, model, batch):
        net = getattr(model, "module", model)  # DeepSpeedEngine.eval() sets its module's mode, not its own
        if not net.training:  # the loop's held-out loss: NLL of the reference answers
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss, n = token_cross_entropy(logits, batch["labels"])
            return loss, {"target_tokens": float(n)}
        m = self.spec.method
        G = m.group_size
        r = self._rollout(net, batch, G)
        adv = group_advantages(r.rewards, G, scale=m.scale_rewards)
        comp, c_mask, P = r.comp, r.c_mask, r.prompt_len
        logits = model(input_ids=r.full, attention_mask=r.attn, position_ids=r.pos, use_cache=False).logits
        logp = token_logps(logits[:, P - 1 : -1], comp)
        per_tok, clipped = clipped_surrogate(logp, logp.detach(), adv[:, None], m.clip_eps)
        kl = torch.zeros_like(logp)
        if m.beta > 0:
            ref_logits = reference_logits_of(model, r.full, r.attn, r.pos)
            kl = k3_kl(logp, token_logps(ref_logits[:, P - 1 : -1], comp))
            per_tok = per_tok + m.beta * kl
        n_tok = None
        if m.loss_type == "dapo":
            # DeepSpeed averages gradients over ranks: each rank's token sum over the mean count of all ranks
            # gives sum / total over every rank's completions, as TRL's `num_items_in_batch` does.
            n_tok = c_mask.sum().float()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(n_tok)
                n_tok = n_tok / torch.distributed.get_world_size()
        loss = aggregate_token_loss(per_tok, c_mask, m.loss_type, m.max_new_tokens, n_tok)
        info = {
            "target_tokens": float(len(comp)),
            "reward_mean": float(r.rewards.mean()),
            "reward_min": float(r.rewards.min()),
            "reward_max": float(r.rewards.max()),
            "kl": float(masked_mean(kl.detach(), c_mask)),
            "completion_len": float(c_mask.sum(-1).float().mean()),
            "clipped": float(masked_mean(clipped, c_mask)),
            **r.info,
        }
        return loss, info

    @torch.no_grad()
    def score_rows(self, model, tokenizer, rows, spec, ctx):
        if not spec.method.exact_match and spec.method.reward_model is None:
            return []
        from ftray.rlhf.rewards import verifiable_rewards

        self.tokenizer, self.spec = tokenizer, spec
        self.synced_gpus = ctx.synced_gpus
        out = []
        for i in range(0, len(rows), 16):
            chunk = rows[i : i + 16]
            ex = [self.examples(r, tokenizer, spec)[0] for r in chunk]
            prompts = [list(e["input_ids"][: e["prompt_len"]]) or [tokenizer.eos_token_id] for e in ex]
            _, _, comp = self._generate(model, prompts, ctx.device, sample=False, n=1)
            c_mask = completion_mask(comp, tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(comp.masked_fill(c_mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)
            refs = [render_prompt(tokenizer, r)[1] for r in chunk]
            checks = {"exact_match": 1.0, "numeric_match": 1.0}
            scores = [verifiable_rewards(t, r, checks) for t, r in zip(texts, refs, strict=True)]
            if self.reward is not None:
                raw = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
                totals, _ = self.reward(raw, texts, refs)
                for i, (s, tot) in enumerate(zip(scores, totals, strict=True)):
                    s["reward"] = tot
                    if self.reward.last_served:
                        s["reward_model_score"] = self.reward.last_served[i]
            out += scores
        return out

    def summarize(self, eval_loss, scores):
        return {"eval_loss": eval_loss, **scores}

