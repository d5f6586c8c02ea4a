"""Adapters: `full` fine-tuning or a peft adapter. peft does the work; this maps the spec onto it."""

from __future__ import annotations

from ftray.config import AdapterSpec

__all__ = [
    "enable_gradient_checkpointing",
    "check_gradient_checkpointing",
    "AdapterError",
    "adapter_report",
    "adapter_state",
    "after_optimizer_step",
    "apply_adapter",
    "apply_freeze",
    "before_optimizer_step",
    "check_targets",
    "HEADS_FILE",
    "load_adapter_state",
    "load_heads",
    "peft_config_for",
    "save_heads",
    "trainable_summary",
]

# Module names that are a model's task head in transformers (sequence/token classification, LM, QA).
HEADS = ("classifier", "score", "lm_head", "cls", "pre_classifier", "qa_outputs")


class AdapterError(ValueError):
    """An adapter does not fit the model; one line naming the field."""


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_gradient_checkpointing(model) -> None:
    """`train.gradient_checkpointing` on a model class that cannot recompute its layers: one line."""
    from ftray.config import SpecError

    inner = _inner(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise SpecError(f"train.gradient_checkpointing: {type(inner).__name__} does not support gradient checkpointing")


def enable_gradient_checkpointing(model) -> None:
    """transformers' own gradient checkpointing, non-reentrant: it needs no input that requires grad (frozen
    embeddings under an adapter), works under ZeRO-3's parameter hooks, and restores the RNG for the
    recomputed forward (dropout draws the same masks)."""
    check_gradient_checkpointing(model)
    _inner(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _module_suffixes(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_targets(model, spec: AdapterSpec) -> None:
    """Every `adapter.target_modules` entry must name modules that exist, and the adapter must fit the model
    family (checked on a meta model, before Ray)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec.kind == "llama_adapter":
        from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

        if model_type not in TRANSFORMERS_MODEL_CONFIG:
            raise AdapterError(
                f"adapter.kind: llama_adapter: peft's adaption prompt supports model types "
                f"{', '.join(sorted(TRANSFORMERS_MODEL_CONFIG))}, not `{model_type}`"
            )
        n_layers = getattr(model.config, "num_hidden_layers", None)
        if spec.adapter_layers and n_layers and spec.adapter_layers > n_layers:
            raise AdapterError(f"adapter.adapter_layers: {spec.adapter_layers} > the model's {n_layers} blocks")
    if spec.kind not in ("lora", "qlora", "adalora", "ia3") or spec.target_modules in (None, "all-linear"):
        return
    names = _module_suffixes(model)
    full = {name for name, _ in model.named_modules()}
    for t in spec.target_modules:
        if t not in names and t not in full:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise AdapterError(
                f"adapter.target_modules: `{t}` is not a module of {type(model).__name__}; linear modules are: {', '.join(linear)}"
            )


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's phases from the job's optimizer steps: 10% at the initial rank, then the budget falls
    (cubic) to the target, then the last 20% train at the final ranks (tinit < total - tfinal always)."""
    return {"total_step": total_steps, "tinit": total_steps // 10, "tfinal": total_steps // 5, "deltaT": 1}


def peft_config_for(model, spec: AdapterSpec, task_type: str, total_steps: int | None = None,
                    tokenizer_path: str | None = None):
    """The peft config of `adapter.kind`: every kind is peft's own, configured from the spec."""
    import math

    import peft

    common = {"task_type": task_type, "modules_to_save": spec.modules_to_save}
    lora = {"r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": spec.target_modules}
    k = spec.kind
    if k in ("lora", "qlora"):
        init = True if spec.init_lora_weights == "default" else spec.init_lora_weights
        return peft.LoraConfig(**common, **lora, use_dora=spec.use_dora, use_rslora=spec.use_rslora,
                               init_lora_weights=init)
    if k == "adalora":
        lora.pop("r")
        return peft.AdaLoraConfig(**common, **lora, use_rslora=spec.use_rslora, target_r=spec.r,
                                  init_r=spec.init_r or math.ceil(1.5 * spec.r), **adalora_schedule(total_steps or 1))
    if k == "ia3":
        return peft.IA3Config(**common, target_modules=spec.target_modules)
    if k == "prefix":
        return peft.PrefixTuningConfig(**common, num_virtual_tokens=spec.num_virtual_tokens)
    if k == "prompt":
        text = {}
        if spec.prompt_init_text is not None:
            text = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": spec.prompt_init_text,
                    "tokenizer_name_or_path": tokenizer_path or model.name_or_path}
        return peft.PromptTuningConfig(**common, num_virtual_tokens=spec.num_virtual_tokens, **text)
    if k == "p_tuning":
        return peft.PromptEncoderConfig(**common, num_virtual_tokens=spec.num_virtual_tokens)
    if k == "llama_adapter":
        layers = spec.adapter_layers or model.config.num_hidden_layers
        return peft.AdaptionPromptConfig(task_type=task_type, adapter_len=spec.num_virtual_tokens, adapter_layers=layers)
    raise AdapterError(f"adapter.kind: `{k}` is not a peft adapter")


def apply_adapter(model, spec: AdapterSpec, task_type: str = "CAUSAL_LM", resume_from: str | None = None,
                  total_steps: int | None = None, tokenizer_path: str | None = None, heads: tuple[str, ...] = ()):
    """Wrap `model` as the spec says; `resume_from` continues an earlier run's adapter. `total_steps`: the
    job's optimizer steps (AdaLoRA's schedule); `tokenizer_path`: for prompt tuning initialised from text;
    `heads`: modules a method added that train beside any adapter (`Method.trainable_heads`: ppo's value head);
    with `resume_from`, they take the weights saved beside that adapter (`save_heads`)."""
    if spec.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.kind == "freeze":
        return _keep_trainable(apply_freeze(model, spec), heads)
    from peft import PeftModel, get_peft_model

    if spec.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if resume_from:
        model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        load_heads(model, resume_from, heads)
        return _keep_trainable(model, heads)
    check_targets(model, spec)
    cfg = peft_config_for(model, spec, task_type, total_steps, tokenizer_path)
    return _keep_trainable(get_peft_model(model, cfg), heads)


def _adalora(model):
    """The AdaLoraModel inside `model` (a PeftModel, maybe under a DeepSpeed engine), else None."""
    model = getattr(model, "module", model)
    cfg = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return model.base_model if cfg is not None and cfg.peft_type == "ADALORA" else None


def adapter_loss(model):
    """A term the adapter adds to the training loss, or None. AdaLoRA: the orthogonal regulariser on P and Q
    (orth_reg_weight x the mean over its lora_A / lora_B of ||P P^T - I||_F, resp. ||Q^T Q - I||_F), which peft
    adds only inside its own forward when it computes the loss from `labels`; ftray's methods compute their
    losses themselves, so the loop adds it here. (AdaLoRA is refused under ZeRO-3: parameters are whole.)"""
    import torch

    ada = _adalora(model)
    if ada is None:
        return None
    name = ada.trainable_adapter_name
    weight = ada.peft_config[name].orth_reg_weight
    terms = []
    for n, p in ada.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n and p.requires_grad:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms or weight <= 0:
        return None
    return weight * torch.stack(terms).mean()


def before_optimizer_step(model, step: int) -> None:
    """Called by the loop between backward and the optimizer step, once per optimizer step (at the
    gradient-accumulation boundary). AdaLoRA: peft's rank allocator scores each rank by |weight x gradient|
    and masks the least important (`update_and_allocate`). Other kinds: nothing."""
    ada = _adalora(model)
    if ada is None:
        return
    # Under ZeRO-1/2 a parameter's .grad is gone after backward (reduced into the optimizer's partitions);
    # DeepSpeed's safe_get_full_grad gathers the averaged full gradient, the same on every rank, so every
    # rank allocates the same ranks. Collective: all ranks call this.
    try:
        from deepspeed.utils import safe_get_full_grad
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        safe_get_full_grad = None
    params = [p for n, p in ada.model.named_parameters() if "lora_" in n and p.requires_grad]
    saved = [p.grad for p in params]
    try:
        if safe_get_full_grad is not None:
            for p in params:
                if p.grad is None:
                    g = safe_get_full_grad(p)
                    p.grad = None if g is None else g.view_as(p).to(p.dtype)
        ada.update_and_allocate(step)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def after_optimizer_step(model, step: int) -> None:
    """Called by the loop right after the optimizer step. AdaLoRA: the step rewrote the masked ranks from the
    optimizer's own (unmasked) copy of the weights under DeepSpeed; mask them again with peft's rank pattern."""
    ada = _adalora(model)
    if ada is None:
        return
    pattern = ada.peft_config[ada.trainable_adapter_name].rank_pattern
    if pattern:
        ada.rankallocator.mask_using_rank_pattern(ada.model, pattern)


def adapter_state(model) -> dict | None:
    """The adapter's training state beyond its weights, for checkpoints (exact resume); None when there is
    none. AdaLoRA: the allocator's importance averages and the current rank pattern."""
    import torch

    ada = _adalora(model)
    if ada is None:
        return None
    ra = ada.rankallocator
    state = {f"{name}/{k}": v.detach().contiguous().clone()
             for name in ("ipt", "exp_avg_ipt", "exp_avg_unc") for k, v in getattr(ra, name).items()}
    pattern = ada.peft_config[ada.trainable_adapter_name].rank_pattern or {}
    state.update({f"rank_pattern/{k}": torch.tensor(v, dtype=torch.bool) for k, v in pattern.items()})
    return state


def load_adapter_state(model, state: dict) -> None:
    """Restore `adapter_state` after the weights and optimizer are loaded. A DeepSpeed checkpoint puts the
    optimizer's unmasked copy back into the weights, so AdaLoRA's pruned ranks are masked again here."""
    ada = _adalora(model)
    if ada is None or not state:
        return
    ra = ada.rankallocator
    for key, v in state.items():
        name, k = key.split("/", 1)
        if name == "rank_pattern":
            continue
        getattr(ra, name)[k] = v
    pattern = {key.split("/", 1)[1]: v.tolist() for key, v in state.items() if key.startswith("rank_pattern/")}
    ada.peft_config[ada.trainable_adapter_name].rank_pattern = pattern or None
    if pattern:
        ra.mask_using_rank_pattern(ada.model, pattern)


def adapter_report(model) -> dict:
    """What the adapter became during training, for run.json: AdaLoRA's final rank of every module."""
    ada = _adalora(model)
    if ada is None:
        return {}
    cfg = ada.peft_config[ada.trainable_adapter_name]
    pattern = cfg.rank_pattern or {}
    ranks = {k.removesuffix(f".{ada.trainable_adapter_name}").removesuffix(".lora_E"): int(sum(bool(x) for x in v))
             for k, v in pattern.items()}
    return {"kind": "adalora", "init_r": cfg.init_r, "target_r": cfg.target_r, "final_ranks": ranks,
            "final_budget": sum(ranks.values())}


def _keep_trainable(model, heads: tuple[str, ...]):
    """Parameters under a module named in `heads` (a whole dotted component) stay trainable."""
    if heads:
        for n, p in model.named_parameters():
            if any(h in n.split(".") for h in heads):
                p.requires_grad_(True)
    return model


# The weights of a method's own modules (`Method.trainable_heads`: ppo's value head) beside an adapter, a full
# model or a merged one: peft saves only the adapter's weights, and transformers' from_pretrained drops the
# head's keys from a full model's safetensors. Keys start at the head's name ("ftray_value_head.weight").
HEADS_FILE = "ftray_heads.safetensors"


def _head_key(key: str, heads: tuple[str, ...]) -> str | None:
    parts = key.split(".")
    return next((".".join(parts[i:]) for i, p in enumerate(parts) if p in heads), None)


def save_heads(state: dict, folder, heads: tuple[str, ...]) -> None:
    """Write the entries of the state dict `state` that belong to a module named in `heads` to `folder`/HEADS_FILE
    (a local folder about to be published); nothing when there are none."""
    from pathlib import Path

    from safetensors.torch import save_file

    picked = {k: v.detach().cpu().contiguous() for key, v in state.items() if (k := _head_key(key, heads))}
    if picked:
        save_file(picked, str(Path(folder, HEADS_FILE)))


def load_heads(model, folder: str, heads: tuple[str, ...]) -> None:
    """Load the modules named in `heads` from `folder`/HEADS_FILE (local or s3://) where the folder has one;
    a head the file lacks keeps its weights. A head of another shape than the saved one is an error."""
    from safetensors.torch import load

    from ftray import storage

    if not heads:
        return
    path = storage.file_in(str(folder), HEADS_FILE)
    if not storage.exists(path):
        return
    with storage.open_file(path) as f:
        saved = load(f.read())
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        own = {k[len(leaf) + 1 :]: v for k, v in saved.items() if leaf in heads and k.startswith(leaf + ".")}
        if own:
            module.load_state_dict(own)


def _blocks(model) -> list[tuple[str, object]]:
    """The transformer blocks: the entries of the longest outermost ModuleList(s) (an encoder-decoder has
    two; lists inside a block, such as T5's `layer`, are not blocks)."""
    import torch

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    lists = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists)]
    longest = max((len(m) for _, m in lists), default=0)
    return [(n, m) for n, m in lists if len(m) == longest]


def apply_freeze(model, spec: AdapterSpec):
    """Freeze everything, then train the last `train_last_layers` blocks and the `train_modules`
    (default: the head). A module name matches as a whole dotted component (`classifier`, `pooler`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_modules())
    wanted = spec.train_modules
    if wanted is None:
        wanted = [h for h in HEADS if any(n.rsplit(".", 1)[-1] == h for n in named)]
    for w in wanted:
        hits = [m for n, m in named.items() if n == w or n.endswith("." + w) or n.rsplit(".", 1)[-1] == w]
        if not hits:
            raise AdapterError(f"adapter.train_modules: `{w}` is not a module of {type(model).__name__}")
        for m in hits:
            for p in m.parameters():
                p.requires_grad_(True)
    if spec.train_last_layers:
        blocks = _blocks(model)
        if not blocks:
            raise AdapterError(f"adapter.train_last_layers: {type(model).__name__} has no list of blocks")
        for _, lst in blocks:
            if spec.train_last_layers > len(lst):
                raise AdapterError(
                    f"adapter.train_last_layers: {spec.train_last_layers} > the model's {len(lst)} blocks"
                )
            for block in list(lst)[-spec.train_last_layers :]:
                for p in block.parameters():
                    p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise AdapterError(
            f"adapter.kind: freeze: nothing to train in {type(model).__name__} (no head found); "
            "set `adapter.train_last_layers` or `adapter.train_modules`"
        )
    return model


def trainable_summary(model) -> dict[str, float]:
    # Under ZeRO-3 a partitioned parameter's numel() is 0; ds_numel is its full size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1)}
