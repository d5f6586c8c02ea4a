"""grpo: Group Relative Policy Optimisation. For each prompt, G completions are sampled from the current
policy; each is rewarded (verifiable functions of the completion and the row's reference answer, and/or a
served reward model); advantages are the rewards relative to their group (minus the group mean, over its
standard deviation); the loss is PPO's clipped surrogate on the completion tokens plus beta x the k3 KL
estimate to a frozen reference (DeepSeekMath, as TRL's GRPOTrainer with one update per rollout), made one
number as `method.loss_type` says (`grpo`, `dapo`, `dr_grpo`: `losses.aggregate_token_loss`).

Rows: `prompt_completion` / `instruction` / `chat`; the completion (last assistant turn) is the reference
answer the verifiable rewards check (`data.columns` maps other names, e.g. GSM8K's `question` and
`final_answer`). The reference policy: under LoRA the model with its adapter disabled, otherwise a frozen
copy (as in `dpo`; none is kept when `beta` is 0). The rollout is a step of its own before the loss
(`prepare`, as TRL's `_generate_and_score_completions` before `compute_loss`); rows, batches, sampling and
held-out scoring are `_rollout.py`'s, which `ppo` uses too. Logged every step: reward mean/min/max (and per source), KL, completion length, clipped
share, the share of completions cut by `max_new_tokens` (`truncated`), and seconds spent generating and scoring
(the rest of the step is learning). `method.mask_truncated_completions` (TRL's) leaves the cut ones out of the loss.

Judged on held-out prompts by greedy decoding: exact match, numeric match, mean verifiable reward, and the
served reward model's mean score when there is one; eval_loss is the reference answer's NLL.
"""

from __future__ import annotations

import torch

from ftray.methods import _rollout
from ftray.methods._base import MethodBase
from ftray.methods._lm import Reference, load_causal_lm
from ftray.methods.losses import (
    aggregate_token_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    masked_mean,
)

__all__ = ["GRPO"]


class GRPO(_rollout.PromptRows, MethodBase):
    name = "grpo"

    def __init__(self):
        self.reference = Reference()
        self.sampler: _rollout.Sampler | None = None

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        _rollout.check_rollout_job(spec, spec.method.group_size, spec.method.beta)

    def setup(self, spec, tokenizer, ctx) -> None:
        from ftray.rlhf import build_reward

        self.sampler = _rollout.Sampler(spec, tokenizer, ctx.synced_gpus, build_reward(spec.method, ctx.reward_model))

    def load_base(self, path, dtype, spec):
        model = load_causal_lm(path, dtype, spec)
        if spec.method.beta > 0:  # without a KL term nothing reads the reference
            self.reference.keep(model, spec, path, dtype)
        return model

    def prepare(self, model, batch):
        return {**batch, "rollout": self.sampler.rollout(model, batch, self.sampler.spec.method.group_size)}

    def loss(self, model, batch):
        r = batch.get("rollout")
        if r is None:  # the held-out loss: the reference answers' NLL
            return _rollout.reference_answer_nll(model, batch)
        m = self.sampler.spec.method
        adv = group_advantages(r.rewards, m.group_size, scale=m.scale_rewards)
        c_mask = r.c_mask
        if m.mask_truncated_completions:  # as TRL: a cut completion takes no part in the loss (nor the logged KL)
            c_mask = c_mask * r.ended[:, None].to(c_mask.dtype)
        logits = model(input_ids=r.full, attention_mask=r.attn, position_ids=r.pos, use_cache=False,
                       logits_to_keep=r.keep).logits
        logp = _rollout.completion_logps(logits, r, m.temperature)
        per_tok, clipped = clipped_surrogate(logp, logp.detach(), adv[:, None], m.clip_eps)
        kl = torch.zeros_like(logp)
        if m.beta > 0:
            kl = k3_kl(logp, _rollout.completion_logps(self.reference.logits(model, r.full, r.attn, r.pos, keep=r.keep), r,
                                                            m.temperature))
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
        return loss, _rollout.rollout_info(r, r.rewards, clipped, float(masked_mean(kl.detach(), c_mask)))

    def score_rows(self, model, tokenizer, rows, spec, ctx):
        if not spec.method.exact_match and spec.method.reward_model is None:
            return []
        # `ftray eval` runs no setup: a sampler without a reward (exact and numeric match only)
        return (self.sampler or _rollout.Sampler(spec, tokenizer, ctx.synced_gpus)).score_rows(model, rows, ctx.device)

