"""What a finished run leaves in its folder: adapter/ or model/ (and merged/), each with the method's heads beside
the weights where it adds any (`ftray_heads.safetensors`: ppo's value head), tokenizer/, metrics.jsonl and
curves.png (run.json is written last, by the driver, as the commit marker); its TensorBoard events in tb/
are written while it trains (train/live.py)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ftray import storage

__all__ = ["write_model_outputs", "write_curves", "merge_adapter"]


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def write_model_outputs(engine, tokenizer, spec, resolved, history: list[dict], rank: int, method) -> None:
    """Collective under ZeRO-3 (every rank must call it); only rank 0 writes."""
    import deepspeed

    from ftray.models.adapters import save_heads

    model = engine.module
    heads = method.trainable_heads(spec)
    staging = Path(tempfile.mkdtemp(prefix="ftray-out-")) if rank == 0 else None
    try:
        if _is_peft(model):
            model.peft_config["default"].base_model_name_or_path = resolved.base
            trainable = [p for p in model.parameters() if p.requires_grad]
            # ZeRO-3: gather just the adapter's weights (not the whole model) to write them.
            with deepspeed.zero.GatheredParameters(trainable, enabled=spec.deepspeed.zero_stage == 3):
                if rank == 0:
                    model.save_pretrained(staging / "adapter", safe_serialization=True)
                    save_heads(model.state_dict(), staging / "adapter", heads)
        else:
            if spec.deepspeed.zero_stage == 3:
                # Collective: every rank sends its partition; rank 0 gets the full state dict.
                state = engine._zero3_consolidated_16bit_state_dict()
            else:
                state = model.state_dict() if rank == 0 else None
            if rank == 0:
                model.save_pretrained(staging / "model", state_dict=state, safe_serialization=True)
                save_heads(state, staging / "model", heads)
                tokenizer.save_pretrained(staging / "model")
                method.save_extra(model, tokenizer, staging / "model", spec)
        if rank != 0:
            return
        tokenizer.save_pretrained(staging / "tokenizer")
        if spec.output.merge and _is_peft(model):
            merged = merge_adapter(resolved.base, staging / "adapter", staging / "merged", tokenizer, method, spec)
            method.save_extra(merged, tokenizer, staging / "merged", spec)
        write_curves(history, staging)
        out = spec.output.dir
        for sub in ("adapter", "model", "merged", "tokenizer"):
            if (staging / sub).exists():
                storage.publish_dir(staging / sub, storage.join(out, sub))
        storage.write_text_atomic(storage.join(out, "metrics.jsonl"), (staging / "metrics.jsonl").read_text())
        if (staging / "curves.png").exists():
            storage.put_file_atomic(staging / "curves.png", storage.join(out, "curves.png"))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def merge_adapter(base: str, adapter_dir, out_dir, tokenizer=None, method=None, spec=None):
    """Merge a LoRA-family adapter into a fresh copy of its base (built as its method builds it:
    causal LM, classifier, encoder, ...) and write a full model, with the method's heads (ppo's value head)
    as they were saved beside the adapter."""
    import torch
    from peft import PeftModel

    from ftray.models.adapters import load_heads, save_heads
    from ftray.models.load import load_model

    fresh = method.load_base(base, torch.float32, spec) if method is not None else load_model(base)
    heads = method.trainable_heads(spec) if method is not None else ()
    model = PeftModel.from_pretrained(fresh, str(adapter_dir))
    load_heads(model, str(adapter_dir), heads)
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    save_heads(merged.state_dict(), out_dir, heads)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return merged


def write_curves(history: list[dict], folder: Path) -> None:
    folder = Path(folder)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval/eval_loss"]) for h in history if "eval/eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=100)
    plt.close(fig)
