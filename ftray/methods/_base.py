"""The optional hooks of a method, with their no-op defaults: every method class derives from `MethodBase`,
so the loop and the driver call each hook unconditionally (no attribute probing)."""

from __future__ import annotations

__all__ = ["MethodBase"]


class MethodBase:
    # Whether `train.group_by_length` applies: its collate pads a micro-batch to its longest row and its loss is
    # a sum over tokens, so rows of about one length per micro-batch only cut padding (sft, causal_lm).
    group_by_length = False
    # Whether `score_rows` gives each row's held-out loss (key `loss`, the mean over rows equal to the loss pass's
    # over the same examples) from the forward that scores the row: the held-out evaluation then skips its loss
    # pass, which would run the same forwards again (dpo: policy and reference over every pair, twice).
    scores_carry_loss = False

    def metrics(self, spec) -> set[str]:
        """The keys its evaluation reports for this job (`summarize`), each logged as `eval/<key>`: what a
        sweep's `metric` may name."""
        return {"eval_loss"}

    def check(self, spec, tokenizer, config, train_rows, eval_rows) -> None:
        """Before any Ray resource: raise SpecError / ModelError naming the field, file or line."""

    def trainable_heads(self, spec) -> tuple[str, ...]:
        """Names of modules the method adds to the model (`load_base`) that train under any adapter (ppo's
        value head): `apply_adapter(..., heads=...)` keeps them trainable beside the adapter."""
        return ()

    def reward_model(self, spec):
        """The served reward model (`RewardModelRef`) its rollouts are scored by, or None. The driver deploys
        it (or checks it runs) once Ray is up; the loop hands its scorer to `setup` (`EvalContext`)."""
        return None

    def setup(self, spec, tokenizer, ctx) -> None:
        """On each worker before the first evaluation (grpo: its sampler and reward function, with the
        served reward model's scorer in `ctx.reward_model`)."""

    def prepare(self, model, batch: dict) -> dict:
        """A training micro-batch made ready for `loss`, a step of its own before it (grpo, ppo: the rollout,
        completions sampled from the current policy and rewarded, as TRL's `_generate_and_score_completions`
        before `compute_loss`). The held-out loss is computed on the collated batch without it."""
        return batch

    def extra_cpus(self, spec) -> float:
        """CPUs the job takes beside its workers: the replica of the reward model the driver deploys for it
        (`reward_model` with a `path`), counted when the driver checks that the job fits the cluster."""
        rm = self.reward_model(spec)
        return rm.num_cpus if rm is not None and rm.path is not None else 0.0

    def state_dict(self) -> dict | None:
        """State the method keeps across steps that a checkpoint must carry (ppo: its adaptive KL
        coefficient); the same on every rank. None: nothing to keep."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned, on resume."""

    def logits(self, model, input_ids, attention_mask):
        """The head's output for a padded batch, as the method's loss and evaluation compute it: what serving
        scores a classifier or reward run with (classify with `method.pooling: mean` pools otherwise)."""
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def save_extra(self, model, tokenizer, folder, spec) -> None:
        """Files beside a fully saved model that make it load in the usual tools."""

    def recorded(self, spec) -> dict:
        """What the job settled from its training data that judging or serving the run needs (classify: the
        label names when `method.labels` is unset), kept in run.json's `method_record`."""
        return {}

    def with_recorded(self, spec, record: dict):
        """The run's spec with `recorded`'s values filled in (`methods.run_spec`): evaluation and serving read
        no training file, which another machine may not have."""
        return spec
