"""Adapters: `full` fine-tuning or a peft adapter. peft does the work; this maps the spec onto it."""

from __future__ import annotations

from ftray.config import AdapterSpec

__all__ = ["AdapterError", "apply_adapter", "check_targets", "trainable_summary"]


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
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from:
        return PeftModel.from_pretrained(model, resume_from, is_trainable=True)
    check_targets(model, spec)
    cfg = LoraConfig(
        task_type=task_type,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save,
    )
    return get_peft_model(model, cfg)


def trainable_summary(model) -> dict[str, float]:
    # Under ZeRO-3 a partitioned parameter's numel() is 0; ds_numel is its full size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / max(total, 1)}
