"""`train.gradient_checkpointing`: transformers' own (non-reentrant) recomputation gives the same loss and
gradients as without (1e-5), with a LoRA adapter whose dropout draws from the RNG and on a full model; the
loop runs with it under ZeRO-3 (the same loss curve as without); a model class without it is one line."""

from __future__ import annotations

import json

import pytest
import torch

from ftray.config import AdapterSpec, SpecError
from ftray.models.adapters import apply_adapter, check_gradient_checkpointing, enable_gradient_checkpointing
from tests._specs import LORA_QV, job_dict, run_here


def _loss_and_grads(model, batch, checkpointing: bool):
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    torch.manual_seed(1)  # the same dropout masks in both runs (the recompute restores this RNG state)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.item(), grads


@pytest.mark.parametrize("adapter", [dict(LORA_QV, dropout=0.1), {"kind": "full"}], ids=["lora-dropout", "full"])
def test_same_loss_and_gradients_as_without(tiny_model, adapter):
    from transformers import AutoModelForCausalLM

    batch = {"input_ids": torch.randint(3, 200, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        model = apply_adapter(model, AdapterSpec(**adapter), task_type="CAUSAL_LM")
        results.append(_loss_and_grads(model, batch, checkpointing))
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert inner.is_gradient_checkpointing == checkpointing
    (loss0, g0), (loss1, g1) = results
    assert abs(loss0 - loss1) < 1e-5
    assert g0.keys() == g1.keys() and g0
    assert max((g0[k] - g1[k]).abs().max().item() for k in g0) < 1e-5


def test_the_loop_runs_with_it_under_zero3(tiny_model, arith, cache_dir, tmp_path):
    curves = {}
    for on in (False, True):
        out = tmp_path / f"gc-{on}"
        d = job_dict(tiny_model, arith[0], None, out, cache_dir, train__max_steps=3, train__gradient_checkpointing=on,
                     deepspeed__zero_stage=3, scaling__num_workers=1)
        run_here(d)
        curves[on] = [h["loss"] for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in h]
        assert json.loads((out / "run.json").read_text())["spec"]["train"]["gradient_checkpointing"] is on
    assert len(curves[True]) == 3 and max(abs(a - b) for a, b in zip(curves[False], curves[True], strict=True)) < 1e-5


def test_a_model_without_it_is_one_line():
    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(SpecError, match=r"^train.gradient_checkpointing: NoCheckpointing does not support"):
        check_gradient_checkpointing(NoCheckpointing())
