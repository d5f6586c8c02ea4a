"""ppo: Proximal Policy Optimisation from a reward (the served reward model and/or verifiable rewards), as
in InstructGPT: the policy samples a completion per prompt; each completion token earns -kl_coef x
(log pi - log ref) and the last one also the completion's reward; a value head on the policy's last hidden
state estimates the return; GAE gives advantages (whitened); the loss is the clipped surrogate plus
vf_coef x the clipped value loss. `kl_target` turns on adaptive KL control (the coefficient follows the
KL measured over all ranks' sequences, and is kept in checkpoints); otherwise it stays fixed. One update per rollout (PPO epochs = 1; the ratios start at 1).

Rows, reference, rollouts and evaluation as `grpo`: both use `_rollout.py`'s functions and `Sampler` (no
class derives from the other). The rollout is a step of its own before the loss (`prepare`). The value head is
trained beside the adapter (or the full model) and is not part of the policy that peft or transformers load: it is
saved beside the adapter, model or merged model (`ftray_heads.safetensors`), so a run continued from a ppo run,
`ftray eval` and a merge start from the trained critic (`load_base` reads it from a full or merged model's
folder, `apply_adapter` from an adapter's). Checkpoints hold it with the other trainable weights.
"""

from __future__ import annotations

import torch

from ftray.methods import _rollout
from ftray.methods._base import MethodBase
from ftray.methods._lm import Reference, load_causal_lm
from ftray.methods.losses import clipped_surrogate, clipped_value_loss, gae, masked_mean, whiten
from ftray.models.adapters import load_heads

__all__ = ["PPO"]

HEAD = "ftray_value_head"


def value_head(model) -> torch.nn.Module:
    net = getattr(model, "module", model)
    for name, mod in net.named_modules():
        if name.split(".")[-1] == HEAD:
            return mod
    raise RuntimeError("ppo: the model has no value head (load it with PPO.load_base)")


class PPO(_rollout.PromptRows, MethodBase):
    name = "ppo"

    def __init__(self):
        self.reference = Reference()
        self.sampler: _rollout.Sampler | None = None
        self.kl_coef = 0.0

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        _rollout.check_rollout_job(spec, spec.method.samples_per_prompt, spec.method.kl_coef)

    def setup(self, spec, tokenizer, ctx) -> None:
        from ftray.rlhf import build_reward

        self.sampler = _rollout.Sampler(spec, tokenizer, ctx.synced_gpus, build_reward(spec.method, ctx.reward_model))
        self.kl_coef = spec.method.kl_coef

    # State the loop keeps in checkpoints: a resumed job goes on with the adapted coefficient.
    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])

    def load_base(self, path, dtype, spec):
        model = load_causal_lm(path, dtype, spec)
        self.reference.keep(model, spec, path, dtype)  # before the value head is added: the reference is the policy alone
        head = torch.nn.Linear(model.config.hidden_size, 1).to(dtype)
        torch.nn.init.normal_(head.weight, std=1.0 / (model.config.hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(head.bias)
        model.add_module(HEAD, head)
        load_heads(model, path, (HEAD,))  # a ppo run's own model/ or merged/: its trained head
        return model

    def trainable_heads(self, spec) -> tuple[str, ...]:
        return (HEAD,)

    def prepare(self, model, batch):
        return {**batch, "rollout": self.sampler.rollout(model, batch, self.sampler.spec.method.samples_per_prompt)}

    def loss(self, model, batch):
        r = batch.get("rollout")
        if r is None:  # the held-out loss: the reference answers' NLL
            return _rollout.reference_answer_nll(model, batch)
        m = self.sampler.spec.method
        device = r.full.device
        full, attn, pos, comp, c_mask, P, scores_t = r.full, r.attn, r.pos, r.comp, r.c_mask, r.prompt_len, r.rewards
        out = model(input_ids=full, attention_mask=attn, position_ids=pos, use_cache=False, output_hidden_states=True,
                    logits_to_keep=r.keep)
        logp = _rollout.completion_logps(out.logits, r, m.temperature)
        values = value_head(model)(out.hidden_states[-1][:, P - 1 : -1]).squeeze(-1).float()
        with torch.no_grad():
            ref_logp = _rollout.completion_logps(self.reference.logits(model, full, attn, pos, keep=r.keep), r, m.temperature)
            kl_tok = (logp - ref_logp) * c_mask
            rewards = -self.kl_coef * kl_tok
            last = (c_mask.sum(-1) - 1).clamp(min=0)
            rewards[torch.arange(len(last), device=device), last] += scores_t
            adv, returns = gae(rewards, values.detach(), c_mask, m.gamma, m.lam)
            adv = whiten(adv, c_mask)
        pg, clipped = clipped_surrogate(logp, logp.detach(), adv, m.clip_eps)
        vl = clipped_value_loss(values, values.detach(), returns, m.value_clip)
        policy_loss, value_loss = masked_mean(pg, c_mask), masked_mean(vl, c_mask)
        loss = policy_loss + m.vf_coef * value_loss

        # The KL of every rank's sequences: the coefficient is one number for the whole job, so every
        # rank takes the same step (a per-rank update would let the ranks' coefficients drift apart).
        kl_n = torch.tensor([float(kl_tok.sum()), float(len(comp))], dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(kl_n)
        seq_kl, n_seq = float(kl_n[0] / kl_n[1]), float(kl_n[1])
        coef = self.kl_coef
        if m.kl_target is not None:  # Ziegler et al. (2019): proportional control of the KL coefficient
            err = max(-0.2, min(0.2, seq_kl / m.kl_target - 1.0))
            self.kl_coef *= 1.0 + err * n_seq / m.kl_horizon
        return loss, {
            **_rollout.rollout_info(r, scores_t, clipped, seq_kl),
            "kl_coef": coef,
            "policy_loss": float(policy_loss.detach()),
            "value_loss": float(value_loss.detach()),
        }

    def score_rows(self, model, tokenizer, rows, spec, ctx):
        if not spec.method.exact_match and spec.method.reward_model is None:
            return []
        return (self.sampler or _rollout.Sampler(spec, tokenizer, ctx.synced_gpus)).score_rows(model, rows, ctx.device)

