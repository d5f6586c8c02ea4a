"""The job spec: pydantic models, loaded and overridden (`--set`) through `ftray.yamlspec`, with errors that
name the field and line.

Every field is documented once, here, in `Field(description=...)`; `ftray validate --schema` prints the
JSON schema built from these descriptions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ftray.yamlspec import (
    SpecError,
    coerce_floats,
    flat_keys,
    format_error,
    load_mapping,
    merge,
    parse_overrides,
)

__all__ = [
    "LORA_FAMILY",
    "MERGEABLE_KINDS",
    "PEFT_KINDS",
    "PROMPT_FAMILY",
    "AdapterSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "JobSpec",
    "SpecError",
    "RESUME_ALLOWABLE",
    "SERVED_NAME",
    "RESUME_FREE",
    "adapter_refusal",
    "load_spec",
    "parse_overrides",
    "spec_changes",
    "spec_from_dict",
    "training_fields",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    path: str = Field(
        description="Base model: a local folder, an s3:// folder, a hub id, or an earlier ftray run folder "
        "(its adapter or model is the starting point; the new run records it as parent)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer location when it differs from `model.path`.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder. Off by default.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; `auto` is flash_attention_2 on GPU when installed, else sdpa."
    )


class DataSpec(_Strict):
    train: str = Field(
        description="Training rows: .jsonl/.json/.parquet/.csv (or .txt for `text`), local or s3:// (or any fsspec URL, "
        "e.g. hf://datasets/ORG/NAME/FILE); or a Hugging Face dataset: hf:ORG/NAME, hf:FOLDER (a dataset repository "
        "or a save_to_disk folder), optionally ?name=CONFIG&split=SPLIT."
    )
    eval: str | None = Field(None, description="Held-out rows in the same format; evaluated before and after training.")
    format: Literal["instruction", "chat", "prompt_completion", "text", "pairs", "labels", "translation", "preference"] = Field(
        "instruction",
        description="Row layout: `instruction` (instruction/input/output), `chat` (messages), "
        "`prompt_completion` (prompt/completion), `text` (plain text; documents split on blank lines), "
        "`pairs` (anchor/positive[/negative], or sentence1/sentence2/score), `labels` (text/label), "
        "`translation` (source/target), `preference` (prompt/chosen/rejected[/history]; a row whose chosen "
        "equals its rejected is a bad row).",
    )
    max_length: int = Field(512, ge=8, description="Tokens per sequence; longer examples are truncated and counted.")
    packing: bool = Field(
        True, description="Pack several examples into one sequence; attention never crosses an example boundary."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="`error`: stop at the first bad row, naming file and line. `skip`: drop, count, report."
    )
    eval_max_rows: int | None = Field(512, ge=1, description="Cap on held-out rows used per evaluation.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns before the format is checked: {format's name: the file's name}, e.g. "
        "`{prompt: question, completion: final_answer}` reads GSM8K as `prompt_completion`. A value with `{name}` "
        "fields is a template filled from the row, e.g. `{instruction: \"Translate into French: {source}\", "
        "output: target}` reads translation pairs as `instruction`.",
    )
    cache_dir: str | None = Field(
        None, description="Where prepared token shards are cached (default: `.ftray-cache` beside `output.dir`)."
    )
    prepare_with: Literal["auto", "ray_data", "driver"] = Field(
        "auto",
        description="Where rows are tokenized (and packed) into shards: `ray_data` (a Ray Data job, tokenizer "
        "actors across the cluster), `driver` (in the submitting process), or `auto`: Ray Data from "
        "50,000 rows, the driver below (Ray Data's start-up, ~5-10 s, is most of the time on small data). "
        "Both write the same shards.",
    )


class SFTMethod(_Strict):
    kind: Literal["sft"] = "sft"
    exact_match: bool = Field(
        False,
        description="Also judge by greedy generation: share of held-out prompts whose generated answer equals "
        "the reference exactly (whitespace-stripped).",
    )
    max_new_tokens: int = Field(16, ge=1, description="Generation length for `exact_match`.")


class CausalLMMethod(_Strict):
    kind: Literal["causal_lm"] = "causal_lm"


class ClassifyMethod(_Strict):
    kind: Literal["classify"] = "classify"
    labels: list[str] | None = Field(
        None,
        min_length=2,
        description="Label names in class-id order; default: the sorted label set of `data.train`. "
        "The eval file must hold the same label set.",
    )
    pooling: Literal["model", "mean"] = Field(
        "model",
        description="What the head reads. `model`: the model class's own choice (BERT: its pooler on [CLS]; a "
        "decoder: the last non-pad token), so the saved model predicts the same in transformers' "
        "AutoModelForSequenceClassification. `mean`: the masked mean of the last hidden state, the vector a "
        "sentence-transformers encoder (all-MiniLM-L6-v2) was trained to output, fed to the model's own linear "
        "head (BERT's `classifier`, a decoder's `score`); the pooler is unused. ftray's eval and serving read it "
        "from run.json; a plain transformers load of a `mean` model would read the pooler instead.",
    )


class ContrastiveMethod(_Strict):
    kind: Literal["contrastive"] = "contrastive"
    temperature: float = Field(
        0.05, gt=0, description="InfoNCE softmax temperature over cosine similarities (0.05 = scale 20)."
    )
    score_max: float = Field(
        5.0, gt=0, description="Scored pairs: `score / score_max` is the target cosine (STS-B scores lie in 0-5)."
    )
    gather_across_ranks: bool = Field(
        True,
        description="Anchor/positive rows: every rank's anchors score against the positives (and hard "
        "negatives) of all data-parallel ranks, gathered with gradients, so the in-batch negatives are the "
        "whole global micro-batch (world size x micro_batch_size), as with one worker holding it all; false: "
        "each rank's own micro-batch only (sentence-transformers' `gather_across_devices`).",
    )


class MaskedLMMethod(_Strict):
    kind: Literal["masked_lm"] = "masked_lm"
    mask_prob: float = Field(
        0.15, gt=0, lt=1, description="Share of tokens that are targets (of those: 80% [MASK], 10% random, 10% kept)."
    )


class ClusterMethod(_Strict):
    kind: Literal["cluster"] = "cluster"
    n_clusters: int | None = Field(
        None, ge=2, description="k of k-means; default: the number of labels in the eval file, else 8."
    )
    temperature: float = Field(0.05, gt=0, description="SimCSE (InfoNCE over two dropout views) temperature.")
    top_terms: int = Field(8, ge=1, description="Top terms listed per cluster in `<output.dir>/clusters.json`.")
    contrastive_weight: float = Field(1.0, ge=0, description="Weight of SimCSE's loss (0: one view per text, no SimCSE).")
    cluster_weight: float = Field(
        0.0, ge=0, description="Weight of DEC's clustering loss: KL(P || Q) of each text's soft assignment Q to the "
        "k-means centres of recent training embeddings and its sharpened target P (0: off). Needs `n_clusters`."
    )
    cluster_temperature: float = Field(0.1, gt=0, description="Q = softmax(cosine(text, centre) / cluster_temperature).")
    cluster_memory: int = Field(512, ge=2, description="The centres are k-means over the last this many training embeddings (every rank's).")
    refresh_every: int = Field(10, ge=1, description="Optimizer steps between two k-means refreshes of the centres.")

    @model_validator(mode="after")
    def _objective(self):
        if self.contrastive_weight == 0 and self.cluster_weight == 0:
            raise ValueError("`contrastive_weight` and `cluster_weight` are both 0: nothing would train")
        if self.cluster_weight > 0 and self.n_clusters is None:
            raise ValueError("`cluster_weight` > 0 needs `n_clusters` (the k of the centres it pulls texts towards)")
        return self


class SentenceOrderMethod(_Strict):
    kind: Literal["sentence_order"] = "sentence_order"
    n_sentences: int = Field(3, ge=2, le=5, description="Sentences per shuffled window; n! classes (3 -> 6).")
    orders_per_window: int = Field(
        1,
        ge=1,
        le=120,
        description="How many of the window's n! orders become examples (distinct, drawn from the text; capped at "
        "n!). More than 1 shows the same sentences under different labels, so only order tells them apart; held-out "
        "accuracy is then scored over the same number of orders per window.",
    )
    objective: Literal["permutation", "pairwise"] = Field(
        "permutation",
        description="permutation: one n!-way head reads the whole shuffled window and names its order. pairwise: a "
        "2-way head reads two of the window's sentences and says whether the first comes before the second (ALBERT's "
        "sentence-order prediction), trained on every ordered pair of every window; a window's order is the one "
        "whose pairs score highest (the sum of log-probabilities over its n(n-1)/2 pairs, each pair read both ways). "
        "Held-out accuracy is the same exact-order figure either way.",
    )


class Seq2SeqMethod(_Strict):
    kind: Literal["seq2seq"] = "seq2seq"
    source_prefix: str = Field("", description="Text put before every source, e.g. `translate English to French: ` (T5).")
    max_new_tokens: int = Field(64, ge=1, description="Generation length when judging by BLEU/chrF.")


class RewardMethod(_Strict):
    kind: Literal["reward"] = "reward"


class DPOMethod(_Strict):
    kind: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="Strength of the tie to the reference (DPO's beta; IPO's tau).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="`sigmoid` (DPO), `ipo` (squared distance of the per-token log-ratio margin to 1/(2 beta)), "
        "`hinge` (SLiC: relu(1 - beta x margin)).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Share of pairs assumed mislabelled (cDPO); `sigmoid` and `hinge` only."
    )

    @model_validator(mode="after")
    def _check(self) -> DPOMethod:
        if self.label_smoothing and self.loss_type == "ipo":
            raise ValueError("`method.label_smoothing` applies to `loss_type` sigmoid and hinge, not ipo")
        return self


class RewardModelRef(_Strict):
    app: str = Field("ftray-reward", description="Serve application that hosts the reward model.")
    scorer: str = Field("rm", description="Name of the scorer in that app (its deployment is `score-<scorer>`).")
    path: str | None = Field(
        None,
        description="A `reward` run folder: the job deploys it as `app` before training (and leaves it running). "
        "Without it, the app must already be running on the cluster.",
    )
    weight: float = Field(1.0, description="Multiplier of its score in the total reward.")
    timeout_s: float = Field(60.0, gt=0, description="How long a scoring call may keep retrying before the job fails.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs of the deployed reward replica (with `path`).")


# The verifiable rewards `grpo` and `ppo` know (`ftray.rlhf.rewards.verifiable_rewards` computes them).
VerifiableReward = Literal["exact_match", "numeric_match", "numeric_closeness", "format"]


class _RolloutMethod(_Strict):
    """What grpo and ppo share: how completions are sampled and rewarded, how held-out prompts are judged."""

    max_new_tokens: int = Field(16, ge=1, description="Length of each sampled completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    rewards: dict[VerifiableReward, float] = Field(
        default_factory=lambda: {"exact_match": 1.0},
        description="Verifiable rewards and their weights: `exact_match` (completion == reference, stripped), "
        "`numeric_match` (last number of the completion == the reference's), `numeric_closeness` (partial credit: "
        "1 - the last number's error relative to the reference's, floored at 0), `format` (`format_regex` matches); "
        "added to the served model's score when there is one.",
    )
    format_regex: str | None = Field(None, description="Regular expression the whole completion must match (`format`).")
    reward_model: RewardModelRef | None = Field(None, description="A served reward model scoring (prompt, completion).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="Clip range of the importance ratio.")
    exact_match: bool = Field(True, description="Judge held-out prompts by greedy exact match (and numeric match).")

    @model_validator(mode="after")
    def _check_rewards(self):
        if not self.rewards and self.reward_model is None:
            raise ValueError("`method.rewards` is empty and there is no `method.reward_model`: nothing to learn from")
        if "format" in self.rewards and not self.format_regex:
            raise ValueError("`method.rewards` has `format` but `method.format_regex` is not set")
        if self.format_regex:
            import re

            try:
                re.compile(self.format_regex)
            except re.error as e:
                raise ValueError(f"`method.format_regex` is not a regular expression: {e}") from None
        return self


class GRPOMethod(_RolloutMethod):
    kind: Literal["grpo"] = "grpo"
    group_size: int = Field(4, ge=2, description="G: completions sampled per prompt; advantages are relative to the group.")
    beta: float = Field(0.04, ge=0, description="Weight of the k3 KL penalty to the reference (0: no reference pass).")
    scale_rewards: bool = Field(True, description="Divide group-centred rewards by the group's standard deviation.")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo",
        description="How per-token losses make the batch loss: `grpo` (the default, ftray's behaviour so far): mean "
        "over each completion's tokens, then over completions (a short completion's tokens weigh more); `dapo` "
        "(TRL's default): sum over the completion tokens of all workers' micro-batches / their count (each "
        "accumulation step weighs the same; TRL pools them too); `dr_grpo`: sum / (completions x "
        "`method.max_new_tokens`).",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="As TRL's GRPOConfig: a completion that used all `method.max_new_tokens` without ending the turn "
        "(no EOS) gets no loss, though its reward still counts in its group's advantages. Without it a reply the "
        "budget cut earns what a finished one earns, and the policy can learn to stop ending its turn.",
    )


class PPOMethod(_RolloutMethod):
    kind: Literal["ppo"] = "ppo"
    samples_per_prompt: int = Field(1, ge=1, description="Completions sampled per prompt.")
    rewards: dict[VerifiableReward, float] = Field(
        default_factory=dict, description="Verifiable rewards and their weights (as `grpo`), added to the served score."
    )
    value_clip: float = Field(0.2, gt=0, description="Clip range of the value update.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount over completion tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, description="Initial weight of the per-token KL penalty in the reward.")
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL control (Ziegler et al.): steer the KL coefficient towards this KL; "
        "unset: the coefficient stays fixed.",
    )
    kl_horizon: int = Field(10_000, ge=1, description="Horizon of the adaptive KL controller (in sequences).")

    @model_validator(mode="before")
    @classmethod
    def _no_loss_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "loss_type" in data:
            raise ValueError("`method.loss_type` applies to dpo and grpo; ppo averages its loss over all completion tokens")
        return data


MethodSpec = Annotated[
    SFTMethod
    | CausalLMMethod
    | ClassifyMethod
    | ContrastiveMethod
    | MaskedLMMethod
    | ClusterMethod
    | SentenceOrderMethod
    | Seq2SeqMethod
    | RewardMethod
    | DPOMethod
    | GRPOMethod
    | PPOMethod,
    Field(discriminator="kind"),
]
# Every method's `kind` tag, read off the union (a new method class cannot be forgotten here).
METHOD_KINDS = tuple(m.model_fields["kind"].default for m in MethodSpec.__origin__.__args__)


# A served model or adapter name (`base:NAME` in a request, a folder in a registry): a path component, never a
# path; "../x" fails here. The serve config and the registry check names with it.
SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Adapter families (peft types): what can be merged into the base, what adds virtual tokens.
LORA_FAMILY = ("lora", "qlora", "adalora")
PEFT_KINDS = (*LORA_FAMILY, "ia3", "prefix", "prompt", "p_tuning", "llama_adapter")
MERGEABLE_KINDS = (*LORA_FAMILY, "ia3")  # weight deltas: merge_and_unload folds them into the base
PROMPT_FAMILY = ("prefix", "prompt", "p_tuning")  # virtual tokens / a key-value prefix: nothing to merge
# Methods whose loss reads next-token logits of a causal LM through `methods/_lm.py` (virtual tokens are
# cut off there); the only ones that take prompt-family adapters, llama_adapter and qlora.
PROMPT_METHODS = ("sft", "causal_lm")


class AdapterSpec(_Strict):
    kind: Literal[
        "full", "freeze", "lora", "qlora", "adalora", "ia3", "prefix", "prompt", "p_tuning", "llama_adapter"
    ] = Field(
        "lora",
        description="`full` fine-tuning; `freeze` (train only `train_last_layers` blocks and `train_modules`); or "
        "a peft adapter: `lora`, `qlora` (LoRA on a 4-bit base, GPU only), `adalora` (LoRA whose ranks are "
        "re-allocated during training), `ia3`, `prefix` (prefix tuning), `prompt` (prompt tuning), `p_tuning` "
        "(prompt encoder), `llama_adapter` (adaption prompt; llama/mistral/gpt2 models). "
        "See docs/compatibility.md for which method and ZeRO stage each takes.",
    )
    r: int = Field(8, ge=1, description="LoRA rank (`adalora`: the average rank it allocates down to).")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt (lora, qlora, adalora, ia3); `all-linear`; or null for peft's "
        "default for the model family."
    )
    modules_to_save: list[str] | None = Field(None, description="Extra modules trained in full and saved (peft kinds).")
    use_dora: bool = Field(False, description="`lora`/`qlora`: weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="`lora`/`qlora`/`adalora`: rank-stabilised scale alpha / sqrt(r).")
    init_lora_weights: Literal["default", "gaussian"] = Field(
        "default",
        description="`lora`/`qlora`: peft's init of A and B: `default` (Kaiming A, zero B) or `gaussian` "
        "(A ~ N(0, 1/r), zero B). PiSSA/OLoRA rewrite the base weights, so their adapter does not apply to the "
        "original base: not offered.",
    )
    init_r: int | None = Field(
        None, ge=1, description="`adalora`: rank every module starts with (default: 1.5 x `r`, rounded up)."
    )
    num_virtual_tokens: int = Field(
        8, ge=1, description="`prefix`/`prompt`/`p_tuning`: virtual tokens; `llama_adapter`: adaption prompt length."
    )
    prompt_init_text: str | None = Field(
        None, description="`prompt`: initialise the virtual tokens from this text's token embeddings (else random)."
    )
    adapter_layers: int | None = Field(
        None, ge=1, description="`llama_adapter`: how many of the top blocks get an adaption prompt (default: all)."
    )
    train_last_layers: int = Field(
        0, ge=0, description="`freeze`: how many of the last transformer blocks are trained (0: none)."
    )
    train_modules: list[str] | None = Field(
        None,
        description="`freeze`: modules trained in full, by name (e.g. `classifier`, `pooler`); null: the "
        "model's head (`classifier`, `score`, `lm_head`, ...), if it has one.",
    )

    @model_validator(mode="after")
    def _only_for_lora(self) -> AdapterSpec:
        k = self.kind
        if k not in (*LORA_FAMILY, "ia3") and self.target_modules:
            raise ValueError("`adapter.target_modules` only applies to `adapter.kind` lora, qlora, adalora, ia3")
        if k not in PEFT_KINDS and self.modules_to_save:
            raise ValueError("`adapter.modules_to_save` only applies to peft adapter kinds")
        if k not in ("lora", "qlora") and (self.use_dora or self.init_lora_weights != "default"):
            raise ValueError("`adapter.use_dora`/`init_lora_weights` only apply to `adapter.kind` lora, qlora")
        if k not in LORA_FAMILY and self.use_rslora:
            raise ValueError("`adapter.use_rslora` only applies to `adapter.kind` lora, qlora, adalora")
        if k != "adalora" and self.init_r is not None:
            raise ValueError("`adapter.init_r` only applies to `adapter.kind: adalora`")
        if self.init_r is not None and self.init_r < self.r:
            raise ValueError(f"`adapter.init_r` ({self.init_r}) must be >= `adapter.r` ({self.r}), the target rank")
        if k != "prompt" and self.prompt_init_text is not None:
            raise ValueError("`adapter.prompt_init_text` only applies to `adapter.kind: prompt`")
        if k != "llama_adapter" and self.adapter_layers is not None:
            raise ValueError("`adapter.adapter_layers` only applies to `adapter.kind: llama_adapter`")
        if self.kind != "freeze" and (self.train_last_layers or self.train_modules is not None):
            raise ValueError("`adapter.train_last_layers`/`train_modules` only apply to `adapter.kind: freeze`")
        return self


class TrainSpec(_Strict):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; wins over `train.epochs` when both are set.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (used when `max_steps` is unset).")
    global_batch_size: int = Field(8, ge=1, description="Sequences per optimizer step, over all workers.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    seed: int = Field(0, description="Seeds model init, data order and dropout.")
    group_by_length: bool = Field(
        True,
        description="sft and causal_lm: put rows of about one length in each micro-batch (sorted within windows of "
        "8 optimizer steps, those steps' batches shuffled) and pad each micro-batch to its longest row, not to "
        "`data.max_length` (packed rows too: over an epoch of gpteacher code at 256 tokens, 11.3 % of the tokens run "
        "were padding, 1.4 % grouped). false: the seeded shuffle alone. Other methods always use the shuffle alone.",
    )
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps.")
    warmup_ratio: float | None = Field(None, ge=0, le=1, description="Warmup as a share of total steps.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a share of `train.lr` (cosine/linear).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null turns it off.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (always before and after).")
    checkpoint_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (always at the end).")
    log_every: int = Field(1, ge=1, description="Print a progress line every N steps (rank 0).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass (transformers' own, non-reentrant): "
        "less activation memory for about a third more compute; with adapters and under ZeRO-3.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("Can't set both `train.warmup_steps` and `train.warmup_ratio`")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("Set `train.max_steps` or `train.epochs`")
        return self


class DeepSpeedSpec(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (DDP), 1, 2 or 3.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU."
    )
    fused_adam: bool = Field(
        False,
        description="On GPU, DeepSpeed's FusedAdam: a CUDA op JIT-built with nvcc on first use, so every GPU worker "
        "needs the CUDA toolkit (DeepSpeed 0.19.8's build also fails where TORCH_CUDA_ARCH_LIST holds an "
        "arch-specific entry such as `9.0a`). Off: torch's fused AdamW (`torch.optim.AdamW(fused=True)`), no build. "
        "CPU runs use torch's AdamW either way; an offloaded optimizer uses DeepSpeed's CPU Adam.",
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("`deepspeed.offload_params` needs `deepspeed.zero_stage: 3`")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("`deepspeed.offload_optimizer` needs `deepspeed.zero_stage` >= 1")
        return self


class ScalingSpec(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")


# What a run may change when it resumes the checkpoints in its `output.dir` (train/launch.py `check_resume`).
# Every other field of the spec is recorded in each checkpoint (`training_fields`) and a resume that changes it is
# refused: it would continue weights, optimizer state and data position that another model, adapter, objective,
# data, seed, batch or sharding produced. Free: how much longer it trains, what it logs, evaluates and where it
# writes. A dotted prefix covers the fields under it.
RESUME_FREE = (
    "name", "model.trust_remote_code", "model.attn_implementation",
    "data.eval", "data.eval_max_rows", "data.cache_dir", "data.prepare_with", "data.on_bad_rows",
    "train.max_steps", "train.epochs", "train.eval_every", "train.checkpoint_every", "train.log_every",
    "train.gradient_checkpointing",  # recomputes the same activations (and the same dropout draws)
    # Another number of workers: the step is the data position for any world size (the global batch is fixed)
    # and a ZeRO checkpoint is resharded on load (`train/checkpoint.py`).
    "scaling.num_workers", "scaling.cpus_per_worker", "scaling.placement_strategy", "scaling.max_failures",
    "output", "storage",
    # Judging held-out rows only: generation for exact match, the k of k-means and the listed topic terms.
    "method.exact_match", "method.n_clusters", "method.top_terms",
    "method.reward_model.app", "method.reward_model.scorer", "method.reward_model.timeout_s",
    "method.reward_model.num_cpus",
)
# Methods whose `method.max_new_tokens` only sizes held-out generation (grpo/ppo: it is the rollout length).
_EVAL_ONLY_MAX_NEW_TOKENS = ("sft", "seq2seq")
# Refused by default, allowed by naming them in `output.resume_changes`: the job re-applies each over the restored
# state (the optimizer's hyperparameters and LR schedule, the micro-batch split of the same global batch, the
# rows read from the restored step on), so the resume is sound but no longer the run the checkpoints began.
RESUME_ALLOWABLE = (
    "train.lr", "train.weight_decay", "train.max_grad_norm", "train.warmup_steps", "train.warmup_ratio",
    "train.lr_schedule", "train.min_lr_ratio", "train.micro_batch_size", "data.train", "data.columns",
)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not (prefix == "data." and k == "columns"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(key: str, fields) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fields)


def training_fields(spec: JobSpec) -> dict[str, Any]:
    """The spec's fields that make its checkpoints what they are, flat (`adapter.r`: 4), JSON values: kept in each
    checkpoint, compared when a run resumes them. Everything but `RESUME_FREE`."""
    flat = _flat(spec.model_dump(mode="json"))
    free = RESUME_FREE + (("method.max_new_tokens",) if spec.method.kind in _EVAL_ONLY_MAX_NEW_TOKENS else ())
    return {k: v for k, v in sorted(flat.items()) if not _covered(k, free)}


def spec_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The training fields whose values differ between a checkpoint's record and this job (a field only one side
    knows, e.g. one a later ftray version added, is not compared)."""
    return [k for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]


class OutputSpec(_Strict):
    dir: str = Field(
        description="The run folder (local or s3://). Running again with the same folder resumes, when the spec's "
        "training fields equal its checkpoints' (else refused, naming the fields; see `output.resume_changes`); a "
        "folder another run is using (its lease file `.ftray-lease.json`) is refused."
    )
    resume_changes: list[str] = Field(
        default_factory=list,
        description="Training fields this job may change from the checkpoints it resumes in `output.dir`, one of: "
        + ", ".join(f"`{k}`" for k in RESUME_ALLOWABLE) + ". The steps, evaluation, logging, checkpoint and "
        "output fields and the number of workers may always change; the model, data format and length, method, "
        "adapter, seed, global batch, ZeRO stage, precision and GPU never (another `output.dir` starts afresh).",
    )
    merge: bool = Field(False, description="Also write the adapter merged into the base as `merged/`.")
    publish_to: str | None = Field(
        None,
        description="A registry folder (local or s3://, as `ftray serve --registry` / a serve config's `registry` "
        "takes) into which rank 0 publishes the adapter while the job trains: after each checkpoint "
        "(`train.checkpoint_every`) and at the end, as `<publish_to>/<publish_name>/` (adapter_config.json, "
        "adapter_model.safetensors and `ftray_publish.json`: the step, whether it is the final one, the weights' "
        "sha256). Each version replaces the last whole (local: written aside, then renamed into place; S3: "
        "uploaded beside the current one, then switched to by its `.complete` marker), so an endpoint serving the "
        "registry reloads the newest one on its next use (`reload_check_s`) without a restart. Written in the "
        "background while the next steps train. Peft adapter kinds only (the generation server serves LoRA).",
    )
    publish_name: str | None = Field(
        None,
        description="The adapter's name under `output.publish_to`, as requests name it (`base:NAME`): letters, "
        "digits, '.', '_', '-', at most 64 (default: the run's `name`, else `output.dir`'s last folder). A sweep's "
        "trials publish as `<this, else the job's name, else the sweep's>-<trial folder>`, side by side.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in `<output.dir>/checkpoints`.")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async",
        description="How a Ray Train job stores a checkpoint taken while it trains: `async` uploads it in the "
        "background while the next steps train (it becomes the one a restart resumes from once uploaded; a "
        "failure before that resumes from the one before), `sync` before the next step. The final checkpoint is "
        "always stored before the job ends; a job without Ray (`--in-process`) stores each one before going on.",
    )
    trackers: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that get the run's parameters, every step's metrics while it trains, and "
        "the run folder as artifacts (mlflow: the `mlflow-skinny` client; wandb: the `wandb` client, configured "
        "by its own $WANDB_MODE, $WANDB_DIR, $WANDB_API_KEY, ...).",
    )
    tracking_uri: str | None = Field(None, description="The MLflow tracking server (default: $MLFLOW_TRACKING_URI).")
    experiment: str | None = Field(
        None,
        description="The MLflow experiment and the W&B project (default: $MLFLOW_EXPERIMENT_NAME, "
        "$WANDB_PROJECT, else `ftray`).",
    )

    @model_validator(mode="after")
    def _check_resume_changes(self) -> OutputSpec:
        for k in self.resume_changes:
            if k not in RESUME_ALLOWABLE:
                raise ValueError(
                    f"`output.resume_changes`: `{k}` is not a field a resumed run may change; one of "
                    + ", ".join(RESUME_ALLOWABLE)
                    + " (the steps, evaluation, logging and output fields need no listing)"
                )
        return self


class StorageSpec(_Strict):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for s3:// paths (default: $AWS_ENDPOINT_URL, else AWS)."
    )
    region: str | None = Field(None, description="S3 region (default: $AWS_DEFAULT_REGION).")


class JobSpec(_Strict):
    name: str | None = Field(None, description="A label for the run (default: the output folder's name).")
    model: ModelSpec
    data: DataSpec
    method: MethodSpec = Field(default_factory=SFTMethod, description="The objective; see `ftray/methods/`.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    train: TrainSpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @model_validator(mode="after")
    def _cross(self) -> JobSpec:
        per_step = self.train.micro_batch_size * self.scaling.num_workers
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"`train.global_batch_size` ({self.train.global_batch_size}) must be a multiple of "
                f"`train.micro_batch_size` x `scaling.num_workers` ({self.train.micro_batch_size} x "
                f"{self.scaling.num_workers} = {per_step})"
            )
        needs = {
            "sft": {"instruction", "chat", "prompt_completion"},
            "causal_lm": {"text"},
            "classify": {"labels"},
            "contrastive": {"pairs"},
            "masked_lm": {"text"},
            "cluster": {"text", "labels"},
            "sentence_order": {"text"},
            "seq2seq": {"translation"},
            "reward": {"preference"},
            "dpo": {"preference"},
            "grpo": {"instruction", "chat", "prompt_completion"},
            "ppo": {"instruction", "chat", "prompt_completion"},
        }[self.method.kind]
        if self.data.format not in needs:
            raise ValueError(
                f"`method.kind: {self.method.kind}` reads `data.format` {sorted(needs)}, not `{self.data.format}`"
            )
        refusal = adapter_refusal(self)
        if refusal:
            raise ValueError(refusal)
        if self.output.publish_name is not None and self.output.publish_to is None:
            raise ValueError("`output.publish_name` names the adapter under `output.publish_to`, which is not set")
        if self.output.publish_to is not None:
            if self.adapter.kind not in PEFT_KINDS:
                raise ValueError(
                    f"`output.publish_to` publishes the job's peft adapter while it trains; `adapter.kind: "
                    f"{self.adapter.kind}` trains the model's own weights and has none to publish (serve the "
                    "finished run instead, or train a peft adapter such as `adapter.kind: lora`)"
                )
            name = self.publish_name
            if not SERVED_NAME.match(name) or ".." in name:
                how = "" if self.output.publish_name else " (the default: the run's `name`, else `output.dir`'s last folder)"
                raise ValueError(
                    f"`output.publish_name`: {name[:80]!r}{how} is not a servable adapter name: use letters, digits, "
                    "'.', '_', '-' (at most 64), starting with a letter or digit"
                )
        if self.method.kind == "reward" and self.adapter.kind in MERGEABLE_KINDS and not self.output.merge:
            # /v1/rewards serves a full sequence-classification model; an adapter alone is served as a generator.
            raise ValueError(
                f"`method.kind: reward` with `adapter.kind: {self.adapter.kind}` needs `output.merge: true` (servable model)"
            )
        return self

    @property
    def grad_accum(self) -> int:
        """Derived: global batch / (micro batch x workers)."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.scaling.num_workers)

    @property
    def run_name(self) -> str:
        return self.name or self.output.dir.rstrip("/").rsplit("/", 1)[-1]

    @property
    def publish_name(self) -> str:
        """The adapter's name under `output.publish_to`."""
        return self.output.publish_name or self.run_name


def adapter_refusal(spec: JobSpec) -> str | None:
    """The adapter x method x ZeRO-stage combinations ftray refuses, with the reason (None: allowed).
    docs/compatibility.md is this function as a table, each allowed cell linked to the test that runs it."""
    a, m, z = spec.adapter.kind, spec.method.kind, spec.deepspeed.zero_stage
    if a == "qlora" and not spec.scaling.use_gpu:
        return ("`adapter.kind: qlora` loads the base in 4 bits with bitsandbytes, which needs a GPU: set "
                "`scaling.use_gpu: true`, or use `adapter.kind: lora` on CPU")
    if a == "qlora" and z == 3:
        return ("`adapter.kind: qlora` with `deepspeed.zero_stage: 3`: ZeRO-3 would partition the base's packed "
                "4-bit weights; use ZeRO 0-2 (the frozen 4-bit base is small already)")
    if a == "adalora" and z == 3:
        return ("`adapter.kind: adalora` with `deepspeed.zero_stage: 3`: its rank allocator multiplies each "
                "parameter by its gradient between backward and step, and ZeRO-3 leaves only a partition of each "
                "parameter on a rank (size 0 vs the full gradient); use ZeRO 0-2")
    if a in (*PROMPT_FAMILY, "llama_adapter", "qlora") and m not in PROMPT_METHODS:
        why = ("peft prepends virtual tokens (or a key-value prefix), which the other methods' pooling, "
               "reference and rollout code does not cut off" if a in PROMPT_FAMILY else
               "peft's adaption prompt is for causal LMs (llama, mistral, gpt2)" if a == "llama_adapter" else
               "only the causal-LM loader of those methods quantizes the base")
        return f"`adapter.kind: {a}` works with `method.kind` {' and '.join(PROMPT_METHODS)} only: {why}; got `{m}`"
    if a in PROMPT_FAMILY and spec.data.packing:
        return (f"`adapter.kind: {a}` with `data.packing: true`: packed examples are kept apart by their "
                "position_ids, which peft drops (prompt, p_tuning) or puts behind a shared key-value prefix "
                "(prefix); set `data.packing: false`")
    if spec.output.merge and a in PEFT_KINDS and a not in MERGEABLE_KINDS:
        return (f"`output.merge: true` with `adapter.kind: {a}`: it adds virtual tokens or prompts, not weight "
                "deltas, so there is nothing to merge into the base")
    return None


# --------------------------------------------------------------------------------------------- loading


def _is_method_tag(part) -> bool:
    # Discriminated unions put the tag (e.g. 'sft') into an error's location; it is not a key the user wrote.
    return isinstance(part, str) and part in METHOD_KINDS


def spec_from_dict(raw: dict, source: str = "<spec>", lines: dict | None = None, set_keys: set[str] = frozenset()) -> JobSpec:
    try:
        return JobSpec.model_validate(coerce_floats(raw))
    except ValidationError as err:
        raise SpecError(format_error(err, source, lines or {}, set(set_keys), _is_method_tag, JobSpec)) from None


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Load, override and validate a job spec. Relative local paths are resolved against the cwd."""
    raw, lines = load_mapping(path, "job spec")
    extra = parse_overrides(overrides or [])
    spec = spec_from_dict(merge(raw, extra), str(path), lines, flat_keys(extra))
    return resolve_paths(spec)


def _absolute(p, hub_ok: bool = False):
    if not isinstance(p, str) or "://" in p:
        return p
    if p.startswith("hf:"):  # a Hugging Face dataset: its local folder (if it is one) made absolute
        source, _, query = p[3:].partition("?")
        q = Path(source).expanduser()
        return "hf:" + (str(q.resolve()) if q.exists() else source) + (f"?{query}" if query else "")
    q = Path(p).expanduser()
    # A bare hub id (org/name) that is not a local path stays as is.
    if hub_ok and not q.is_absolute() and not q.exists() and p.count("/") == 1 and not p.startswith("."):
        return p
    return str(q.resolve())


_PATHS = (("model", "path", True), ("model", "tokenizer", True), ("data", "train", False),
          ("data", "eval", False), ("data", "cache_dir", False), ("output", "dir", False),
          ("output", "publish_to", False))


def absolute_paths(d: dict) -> dict:
    """A job mapping (whole or partial) with its local paths made absolute against this process's cwd."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for section, key, hub_ok in _PATHS:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = _absolute(out[section][key], hub_ok)
    return out


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Make local paths absolute: Ray workers do not share the driver's working directory."""
    return JobSpec.model_validate(absolute_paths(spec.model_dump()))
