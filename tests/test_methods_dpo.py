"""dpo: spec refusals, the reference (LoRA: the adapter disabled, no copy; full: a frozen copy that is not
a parameter), loss on response tokens only, trainable parameters, and a 2-worker Ray Train + DeepSpeed run
whose held-out implicit-reward accuracy rises from the reference's 0.5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftray.config import SpecError, resolve_paths, spec_from_dict
from ftray.data.encode import IGNORE, ensure_chat_template
from ftray.data.rows import DataError
from ftray.methods import get_method
from tests._methods_tiny import write_jsonl
from tests._preference import preference_rows, preference_task
from tests._specs import ROOT, method_spec, needs_shared, run_here

M = get_method("dpo")
LORA = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="session")
def prefs(work) -> tuple[Path, Path]:
    return preference_task(work / "prefs")


def spec_for(model, train, test, out, adapter=None, method=None, **over) -> dict:
    return method_spec("dpo", model, train, test, out, adapter, method, **over)


def _tok(path):
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(path))
    ensure_chat_template(tok)
    return tok


def test_spec_refusals(tiny_model, prefs, tmp_path):
    with pytest.raises(SpecError, match=r"method.label_smoothing.* applies to `loss_type` sigmoid and hinge, not ipo"):
        spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, method={"loss_type": "ipo", "label_smoothing": 0.1}))
    with pytest.raises(SpecError, match=r"method.loss_type"):
        spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, method={"loss_type": "kto"}))
    with pytest.raises(SpecError, match=r"method.beta"):
        spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, method={"beta": 0}))


def test_bad_input_refused_before_ray(tiny_model, prefs, tmp_path, ray_down):
    from ftray.models.load import ModelError
    from ftray.train.launch import train
    from tests._serve_models import make_adapter_run

    missing = write_jsonl(tmp_path / "m.jsonl", [*preference_rows(2, 0), {"prompt": "1+1=", "rejected": "3"}])
    with pytest.raises(DataError, match=r"m.jsonl:3: missing `chosen`"):
        train(resolve_paths(spec_from_dict(spec_for(tiny_model, missing, None, tmp_path / "a"))))
    with pytest.raises(ModelError, match=r"model.path: .*/nope: no such folder"):
        train(resolve_paths(spec_from_dict(spec_for(tmp_path / "nope", prefs[0], None, tmp_path / "b"))))
    # Continuing an adapter run under LoRA: disabling it would make the bare base the reference.
    run = make_adapter_run(tiny_model, tmp_path / "sft-run", seed=1)
    with pytest.raises(SpecError, match=r"is an adapter run; dpo with LoRA needs a full model as its reference"):
        train(resolve_paths(spec_from_dict(spec_for(run, prefs[0], None, tmp_path / "c"))))
    assert not ray_down.is_initialized()


def test_examples_mask_the_prompt_and_keep_replies_within_max_length(tiny_model, prefs, tmp_path):
    spec = spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, data__max_length=16))
    tok = _tok(tiny_model)
    row = {"prompt": "12+7=", "chosen": "19", "rejected": "4444444444444444444444", "history": []}
    (e,) = M.examples(row, tok, spec)
    assert len(e["input_ids"]) <= 16 and len(e["rejected_ids"]) == 16 and e["truncated"]
    # labels are the reply tokens only, and the two sequences share their (masked) prompt
    n_prompt = e["labels"].index(next(t for t in e["labels"] if t != IGNORE))
    assert e["input_ids"][:n_prompt] == e["rejected_ids"][:n_prompt] and n_prompt >= 1
    assert all(t == IGNORE for t in e["rejected_labels"][:n_prompt]) and e["rejected_labels"][n_prompt:] == e["rejected_ids"][n_prompt:]
    assert tok.decode(e["labels"][n_prompt:]).startswith("19")


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_reference_and_trainable_params(adapter, tiny_model, prefs, tmp_path):
    from ftray.methods.losses import sequence_logps
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_model

    spec = spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, LORA if adapter == "lora" else {"kind": "full"}))
    tok = _tok(tiny_model)
    batch = M.collate([e for r in preference_rows(4, 0) for e in M.examples(r, tok, spec)], tok.pad_token_id)
    torch.manual_seed(0)
    model = apply_adapter(M.load_base(str(tiny_model), torch.float32, spec), spec.adapter, task_type=M.task_type).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in load_model(str(tiny_model)).parameters()) + (
        sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    )  # the frozen copy (full) is not a parameter: never trained, never saved
    loss, _ = M.loss(model, batch)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5)  # policy == reference at the start
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, info = M.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert info["target_tokens"] == 4 and loss.item() < 0.6931472
    for n, p in model.named_parameters():
        assert (not torch.equal(before[n], p.detach())) == p.requires_grad, n
    # The reference is still the untouched base: its log-probs equal a freshly loaded base model's.
    base = load_model(str(tiny_model)).eval()
    with torch.no_grad():
        want, _ = sequence_logps(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    got, _ = sequence_logps(M.reference.logits(model, batch["input_ids"], batch["attention_mask"]), batch["labels"])
    # ... kept by the method's instance, not hung on the model
    assert not any(isinstance(v, torch.nn.Module) and v is not model for v in vars(model).values() if not isinstance(v, dict))
    assert torch.allclose(got, want, atol=1e-5)


def test_in_process_zero2_lora_implicit_reward_accuracy_rises(tiny_model, prefs, cache_dir, tmp_path):
    """The method's mechanics through the loop and DeepSpeed on one process (LoRA: the reference is the
    base with the adapter switched off)."""
    out = tmp_path / "dpo"
    d = spec_for(
        tiny_model, prefs[0], prefs[1], out, {**LORA, "target_modules": "all-linear"},
        method={"beta": 0.5, "label_smoothing": 0.05}, train__max_steps=8, data__cache_dir=str(cache_dir),
    )
    record = run_here(d)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps",
                      "length_heuristic_accuracy", "balanced_accuracy", "balanced_pairs", "beats_length_heuristic"}
    assert b["reward_accuracy"] == 0.5 and b["reward_margin"] == 0.0  # the policy starts as its reference
    assert a["reward_accuracy"] > 0.5 and a["reward_margin"] > 0 and a["eval_loss"] < b["eval_loss"], (b, a)
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_ftray_eval_of_a_full_run_reproduces_its_final_evaluation(tiny_model, prefs, cache_dir, tmp_path):
    """A full fine-tune judged later by `ftray eval` is compared with the model it started from (as during
    training), not with a copy of itself: the same figures as the run's own final evaluation."""
    from ftray.eval.evaluate import evaluate

    out = tmp_path / "dpo-full"
    d = spec_for(tiny_model, prefs[0], prefs[1], out, {"kind": "full"}, method={"beta": 0.5}, train__max_steps=4,
                 train__lr=1e-3, data__cache_dir=str(cache_dir))
    after = run_here(d)["eval"]["after"]
    assert after["reward_margin"] != 0.0, after  # the policy has moved off its reference
    got = evaluate(str(out), str(prefs[1]))
    for k in ("eval_loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert got[k] == pytest.approx(after[k], rel=1e-4, abs=1e-5), (k, got, after)


def test_shipped_job_validates(tiny_model):
    from ftray.config import load_spec
    from ftray.methods import check_method
    from ftray.train.launch import check_job

    needs_shared("preference", "oasst1_train.jsonl")
    spec = load_spec(ROOT / "jobs" / "dpo.yaml", [f"model.path={tiny_model}"])
    assert spec.method.kind == "dpo" and spec.adapter.kind == "lora"
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)
    assert len(plan.train_rows.rows) == 542
