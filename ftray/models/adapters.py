"""Adapters: `full` fine-tuning or a peft adapter. peft does the work; this maps the spec onto it."""

from __future__ import annotations

from ftray.config import AdapterSpec

__all__ = ["AdapterError", "apply_adapter", "apply_freeze", "check_targets", "trainable_summary"]

# Module names that are a model's task head in transformers (sequence/token classification, LM, QA).
HEADS = ("classifier", "score", "lm_head", "cls", "pre_classifier", "qa_outputs")


class AdapterError(ValueError):
    """An adapter does not fit the model; one line naming the field."""


def _module_suffixes(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_targets(model, spec: AdapterSpec) -> None:
    """Every `adapter.target_modules` entry must name modules that exist (checked on a meta model)."""
    if spec.kind != "lora" or spec.target_modules in (None, "all-linear"):
        return
    names = _module_suffixes(model)
    full = {name for name, _ in model.named_modules()}
    for t in spec.target_modules:
        if t not in names and t not in full:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise AdapterError(
                f"adapter.target_modules: `{t}` is not a module of {type(model).__name__}; linear modules are: {', '.join(linear)}"
            )


def apply_adapter(model, spec: AdapterSpec, task_type: str = "CAUSAL_LM", resume_from: str | None = None):
    """Wrap `model` as the spec says; `resume_from` continues an earlier run's adapter."""
    if spec.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    heads = tuple(getattr(model, "_ftray_trainable_heads", ()))  # a method's own new modules (ppo's value head)
    if spec.kind == "freeze":
        return _keep_trainable(apply_freeze(model, spec), heads)
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from:
        return _keep_trainable(PeftModel.from_pretrained(model, resume_from, is_trainable=True), heads)
    check_targets(model, spec)
    cfg = LoraConfig(
        task_type=task_type,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save,
    )
    return _keep_trainable(get_peft_model(model, cfg), heads)


def _keep_trainable(model, heads: tuple[str, ...]):
    """Parameters under a module named in `heads` (a whole dotted component) stay trainable."""
    if heads:
        for n, p in model.named_parameters():
            if any(h in n.split(".") for h in heads):
                p.requires_grad_(True)
    return model


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
