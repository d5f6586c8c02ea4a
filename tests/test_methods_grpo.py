"""grpo: spec refusals before Ray, rollouts and the loss on one process (gradients reach the adapter only,
the KL is 0 while the policy is its reference), and a 2-worker Ray Train + DeepSpeed run that logs the
rollout metrics every step and judges held-out prompts by exact match."""

from __future__ import annotations

import json

import pytest
import torch

from ftray.config import SpecError, resolve_paths, spec_from_dict
from ftray.data.encode import ensure_chat_template
from ftray.data.rows import DataError
from ftray.methods import EvalContext, get_method
from tests._methods_tiny import write_jsonl
from tests._specs import ROOT, method_spec, needs_shared, run_here

M = get_method("grpo")
LORA = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}


def spec_for(model, train, test, out, adapter=None, method=None, **over) -> dict:
    return method_spec("grpo", model, train, test, out, adapter, method, **over)


def test_spec_refusals(tiny_model, arith, tmp_path):
    with pytest.raises(SpecError, match=r"method.group_size"):
        spec_from_dict(spec_for(tiny_model, arith[0], None, tmp_path, method={"group_size": 1}))
    with pytest.raises(SpecError, match=r"`method.rewards` has `format` but `method.format_regex` is not set"):
        spec_from_dict(spec_for(tiny_model, arith[0], None, tmp_path, method={"rewards": {"format": 1.0}}))
    with pytest.raises(SpecError, match=r"nothing to learn from"):
        spec_from_dict(spec_for(tiny_model, arith[0], None, tmp_path, method={"rewards": {}}))
    with pytest.raises(SpecError, match=r"method.rewards"):
        spec_from_dict(spec_for(tiny_model, arith[0], None, tmp_path, method={"rewards": {"bleu": 1.0}}))


def test_bad_input_refused_before_ray(tiny_model, arith, tmp_path, ray_down):
    from ftray.train.launch import train

    with pytest.raises(SpecError, match=r"method.reward_model.path: .*/no-rm: no such folder"):
        train(resolve_paths(spec_from_dict(spec_for(
            tiny_model, arith[0], None, tmp_path / "a", method={"reward_model": {"path": str(tmp_path / "no-rm")}}
        ))))
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "final_answer": "2"}, {"question": "2+2="}])
    with pytest.raises(DataError, match=r"q.jsonl:2: missing column 'final_answer' named in `data.columns`"):
        train(resolve_paths(spec_from_dict(spec_for(
            tiny_model, q, None, tmp_path / "b", data__columns={"prompt": "question", "completion": "final_answer"}
        ))))
    assert not ray_down.is_initialized() and not (tmp_path / "a").exists()


def test_rollout_loss_on_one_process(tiny_model, arith, tmp_path):
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_model, arith[0], None, tmp_path, method={"group_size": 3, "temperature": 1.5}))
    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in arith[0].read_text().splitlines()[:4]]
    ex = [e for r in rows for e in M.examples(r, tok, spec)]
    assert all(tok.decode(e["input_ids"][: e["prompt_len"]], skip_special_tokens=True) == r["prompt"] for e, r in zip(ex, rows, strict=True))
    batch = M.collate(ex, tok.pad_token_id)
    torch.manual_seed(0)
    model = apply_adapter(M.load_base(str(tiny_model), torch.float32, spec), spec.adapter, task_type=M.task_type)
    M.setup(spec, tok, EvalContext())
    model.eval()
    nll, info = M.loss(model, batch)  # no rollout in the batch (the held-out loss): the reference answers' NLL
    assert set(info) == {"target_tokens"} and nll.item() > 0
    model.train()
    rolled = M.prepare(model, batch)  # the rollout, a step of its own before the loss
    assert set(rolled) == set(batch) | {"rollout"} and rolled["rollout"].comp.shape[0] == 12
    loss, info = M.loss(model, rolled)
    assert info["target_tokens"] == 12 and 0 <= info["reward_min"] <= info["reward_mean"] <= info["reward_max"] <= 1
    assert info["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference before any update
    assert 1 <= info["completion_len"] <= 4 and info["generate_s"] > 0 and "reward_exact_match" in info
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    if info["reward_max"] > info["reward_min"]:  # some group has a signal: the adapter's gradient is not zero
        assert any(g.abs().sum() > 0 for g in grads.values())


def test_in_process_zero2_lora_logs_rollouts(tiny_model, arith, cache_dir, tmp_path):
    """Rollouts, rewards and the loss through the loop and DeepSpeed on one process; scoring by a served
    reward model on Ray: tests/test_rlhf_served.py."""
    out = tmp_path / "grpo"
    d = spec_for(tiny_model, arith[0], arith[1], out, method={"group_size": 4}, train__max_steps=3,
                 data__cache_dir=str(cache_dir), data__eval_max_rows=16)
    d["deepspeed"] = {"zero_stage": 2}
    record = run_here(d)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if "loss" in s]
    assert len(train_steps) == 3
    for s in train_steps:
        for k in ("reward_mean", "reward_min", "reward_max", "kl", "completion_len", "generate_s", "generate_share",
                  "score_s", "reward_exact_match"):
            assert f"train/{k}" in s, (k, s)
        assert 0 < s["train/generate_share"] < 1 and 0 <= s["train/truncated"] <= 1
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert {"eval_loss", "exact_match", "numeric_match"} <= set(a)
    assert b["eval_loss"] > 1.0, b  # the reference answers' NLL under a random model, not a rollout loss
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_shipped_jobs_validate(tiny_model, arith):
    from ftray.config import load_spec
    from ftray.methods import check_method
    from ftray.train.launch import check_job

    spec = load_spec(ROOT / "jobs" / "grpo_arith.yaml",
                     [f"model.path={tiny_model}", f"data.train={arith[0]}", f"data.eval={arith[1]}"])
    assert spec.method.kind == "grpo" and spec.method.group_size == 16
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)
    needs_shared("qa", "gsm8k_train.jsonl")
    spec = load_spec(ROOT / "jobs" / "grpo_gsm8k.yaml", [f"model.path={tiny_model}"])
    plan = check_job(spec)
    row = plan.train_rows.rows[0]
    assert set(row) >= {"prompt", "completion"} and row["completion"].strip().lstrip("-").replace(".", "").isdigit()
    assert len(plan.train_rows.rows) == 7473
