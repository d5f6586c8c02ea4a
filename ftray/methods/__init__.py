"""Methods: one file each. A method says what its rows look like, which model it trains, how a
batch is built, what the loss is and how it is judged; the loop, DeepSpeed, checkpoints and Ray are
not its business.

The registry is an explicit dict, checked by a test against the files in this folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ftray.methods import (
    causal_lm,
    classify,
    cluster,
    contrastive,
    dpo,
    grpo,
    masked_lm,
    ppo,
    reward,
    sentence_order,
    seq2seq,
    sft,
)
from ftray.methods._base import MethodBase

__all__ = ["EvalContext", "Method", "REGISTRY", "check_method", "get_method", "load_run_model", "run_spec"]


@dataclass(frozen=True)
class EvalContext:
    """What a method's evaluation may need to know about where it runs (not how)."""

    synced_gpus: bool = False  # every rank must run the same number of forward passes (ZeRO-3)
    device: str = "cpu"
    # The served reward model's scorer, (prompts, completions) -> scores, when the method names one
    # (`Method.reward_model`); built by the loop, so no method reaches Ray Serve itself.
    reward_model: Callable[[list[str], list[str]], list[float]] | None = None


class Method(Protocol):
    name: str
    formats: tuple[str, ...]  # data formats (see ftray.data.rows) this method reads
    task_type: str  # peft TaskType of its adapters (CAUSAL_LM, SEQ_CLS, FEATURE_EXTRACTION, SEQ_2_SEQ_LM)
    packable: bool  # whether its examples may be packed into one sequence
    group_by_length: bool  # whether `train.group_by_length` orders its rows (MethodBase: False)

    def load_base(self, path: str, dtype: torch.dtype, spec) -> torch.nn.Module:
        """The pre-trained model, with whatever head the method adds (e.g. a classifier)."""

    def examples(self, row: dict, tokenizer, spec) -> list[dict[str, Any]]:
        """One checked row -> tokenized examples ({"input_ids": [...], ...}); [] or an empty
        `input_ids` drops it (counted)."""

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of the batch and its weight under `"target_tokens"` (how many items it averages)."""

    def score_rows(self, model, tokenizer, rows: list[dict], spec, ctx: EvalContext) -> list[dict[str, float]]:
        """Per held-out row metrics (e.g. exact match); the loop averages them over all ranks."""

    def summarize(self, eval_loss: float, scores: dict[str, float]) -> dict[str, float]: ...

    def save_extra(self, model, tokenizer, folder, spec) -> None:
        """Files beside a fully saved model that make it load in the usual tools (may do nothing)."""

    # Optional hooks, each with a no-op default in `ftray.methods._base.MethodBase` (every method derives
    # from it; the loop and the driver call them unconditionally):
    #   check(spec, tokenizer, config, train_rows, eval_rows)  before Ray; raises SpecError / ModelError
    #   reward_model(spec) -> RewardModelRef | None   the served reward model its rollouts are scored by
    #                                   (grpo, ppo): the driver deploys or checks it, the loop hands its
    #                                   scorer to setup as `ctx.reward_model`
    #   setup(spec, tokenizer, ctx)     on each worker before the first evaluation (e.g. grpo's sampler)
    #   prepare(model, batch) -> batch  a training micro-batch made ready for `loss` (grpo, ppo: the rollout);
    #                                   the held-out loss skips it
    #   extra_cpus(spec) -> float       CPUs the job takes beside its workers (e.g. the reward replica that
    #                                   grpo deploys), counted when the driver checks the job fits the cluster
    #   state_dict() / load_state_dict(state)  what a checkpoint carries of the method (ppo's KL coefficient)
    #   logits(model, input_ids, attention_mask)  the head's output as loss and evaluation compute it; what
    #                                   serving scores with (classify's `method.pooling: mean` pools itself)
    #   recorded(spec) -> dict / with_recorded(spec, record)  what the run settled from its training data
    #                                   (classify's label names), kept in run.json and read back (`run_spec`)
    # `loss` may return more numbers in its info dict than `target_tokens`: the loop logs them every step
    # as `train/<key>`, averaged over micro-batches and ranks (`*_min` / `*_max`: the extreme; `*_s`:
    # seconds, summed over micro-batches, also logged as `train/<name>_share` of the step time).


# kind -> the method's class; `get_method` makes one instance per use, so whatever a method keeps during a run
# (grpo's sampler and reward, ppo's KL coefficient) belongs to that run alone.
REGISTRY: dict[str, type[MethodBase]] = {
    "sft": sft.SFT,
    "causal_lm": causal_lm.CausalLM,
    "classify": classify.Classify,
    "contrastive": contrastive.Contrastive,
    "masked_lm": masked_lm.MaskedLM,
    "cluster": cluster.Cluster,
    "sentence_order": sentence_order.SentenceOrder,
    "seq2seq": seq2seq.Seq2Seq,
    "reward": reward.Reward,
    "dpo": dpo.DPO,
    "grpo": grpo.GRPO,
    "ppo": ppo.PPO,
}


def get_method(kind: str) -> Method:
    """A new instance of the method `kind` (its per-run state starts empty)."""
    return REGISTRY[kind]()


def run_spec(run):
    """The spec of the finished run in `run` (a RunFolder) with what its method recorded in run.json filled in
    (`MethodBase.with_recorded`), or None for a folder that is not a run. The checkpoints and run.json keep
    the spec as written, so a resume compares like with like."""
    spec = run.spec()
    if spec is None:
        return None
    return get_method(spec.method.kind).with_recorded(spec, run.record().get("method_record") or {})


def load_run_model(spec, resolved, dtype=torch.float32, merge: bool = False, method: Method | None = None):
    """A run's model as its method builds it (head, label names) with its adapter, if it has one: what
    `ftray eval` judges (adapter kept) and what serving scores with (`merge`: a LoRA-family adapter folded
    into its base). `method`: the instance that will compute on it (what `load_base` keeps, e.g. dpo's
    frozen reference, stays with that instance); a new one by default."""
    from ftray.config import MERGEABLE_KINDS
    from ftray.models.adapters import apply_adapter

    method = method or get_method(spec.method.kind)
    model = method.load_base(resolved.base, dtype, spec)
    if resolved.adapter:
        model = apply_adapter(model, spec.adapter, task_type=method.task_type, resume_from=resolved.adapter,
                              heads=method.trainable_heads(spec))
        if merge and spec.adapter.kind in MERGEABLE_KINDS:
            model = model.merge_and_unload()
    return model


def check_method(spec, resolved, train_rows, eval_rows) -> None:
    """A method's own checks before any Ray resource is taken (e.g. classify: the eval label set is the
    training label set; masked_lm: the tokenizer has a mask token). Raises SpecError / ModelError.
    Methods without checks inherit MethodBase's no-op `check`."""
    method = get_method(spec.method.kind)
    from ftray.models.load import load_config, load_tokenizer

    tok = load_tokenizer(resolved.tokenizer, spec.model.trust_remote_code)
    method.check(spec, tok, load_config(resolved.base, spec.model.trust_remote_code), train_rows, eval_rows)
