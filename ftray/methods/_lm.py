"""What the language-modelling methods (sft, causal_lm) share: the model class, examples, batches, loss."""

from __future__ import annotations

import torch

from ftray.data.encode import IGNORE
from ftray.methods.losses import token_cross_entropy


def load_causal_lm(path, dtype, spec):
    from ftray.models.load import load_model

    extra = {}
    if spec.adapter.kind == "qlora":  # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, GPU only), LoRA on top
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
        extra["device_map"] = {"": torch.cuda.current_device()}
    return load_model(path, dtype, spec.model.trust_remote_code, spec.model.attn_implementation, **extra)


def collate_tokens(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows (with position_ids, all the same length) stack as they are and carry no attention
    mask; unpacked rows are right-padded to the longest and masked."""
    if examples and examples[0].get("position_ids") is not None:
        return {
            "input_ids": torch.tensor([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
            "position_ids": torch.tensor([e["position_ids"] for e in examples]),
        }
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    # Prompt / p-tuning (peft) put their virtual tokens before the input: their logits predict nothing here.
    logits = logits[:, logits.shape[1] - batch["labels"].shape[1] :]
    loss, n = token_cross_entropy(logits, batch["labels"])
    return loss, {"target_tokens": float(n)}
