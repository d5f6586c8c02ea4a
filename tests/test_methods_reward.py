"""reward: preference rows (bad ones named by file:line, or counted and skipped), refusals before any
Ray resource, trainable parameters, and a 2-worker Ray Train + DeepSpeed run whose merged output the
Serve scorer loads as a reward model and scores as the run judged it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftray.config import SpecError, resolve_paths, spec_from_dict
from ftray.data.rows import DataError, read_checked
from ftray.methods import get_method
from tests._methods_tiny import write_jsonl
from tests._preference import preference_rows, preference_task
from tests._specs import ROOT, method_spec, needs_shared, run_here

M = get_method("reward")
LORA = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="session")
def prefs(work) -> tuple[Path, Path]:
    return preference_task(work / "prefs")


def spec_for(model, train, test, out, adapter=None, **over) -> dict:
    return method_spec("reward", model, train, test, out, adapter, **over)


def test_preference_rows_errors_name_file_and_line(tmp_path):
    ok = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    p = write_jsonl(tmp_path / "same.jsonl", [ok, {"prompt": "1+1=", "chosen": "2", "rejected": "2"}, ok])
    with pytest.raises(DataError, match=r"same.jsonl:2: `chosen` and `rejected` are the same text"):
        read_checked(str(p), "preference")
    checked = read_checked(str(p), "preference", on_bad_rows="skip")
    assert len(checked.rows) == 2 and checked.skipped == 1 and checked.first_skipped[0].endswith("same.jsonl:2: `chosen` and `rejected` are the same text")
    p = write_jsonl(tmp_path / "missing.jsonl", [ok, ok, {"prompt": "1+1=", "chosen": "2"}])
    with pytest.raises(DataError, match=r"missing.jsonl:3: missing `rejected`"):
        read_checked(str(p), "preference")
    p = write_jsonl(tmp_path / "hist.jsonl", [{**ok, "history": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"hist.jsonl:1: `history\[0\].role` is 'bot'"):
        read_checked(str(p), "preference")
    row = read_checked(str(write_jsonl(tmp_path / "ok.jsonl", [{**ok, "history": [], "id": 7}])), "preference").rows[0]
    assert row == {**ok, "history": []}  # extra fields (id, source) dropped; no history is an empty one


def test_spec_refusals(tiny_model, prefs, tmp_path):
    with pytest.raises(SpecError, match=r"reward` with `adapter.kind: lora` needs `output.merge: true`"):
        spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, LORA))
    with pytest.raises(SpecError, match=r"`method.kind: reward` reads `data.format` \['preference'\], not `labels`"):
        spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, data__format="labels"))


def test_bad_input_refused_before_ray(tiny_model, prefs, tmp_path, ray_down):
    """A reward model path that does not exist and identical chosen/rejected: one-line errors, no Ray started."""
    from ftray.models.load import ModelError
    from ftray.train.launch import train

    with pytest.raises(ModelError, match=r"model.path: .*/no-such-rm: no such folder"):
        train(resolve_paths(spec_from_dict(spec_for(tmp_path / "no-such-rm", prefs[0], None, tmp_path / "a"))))
    bad = write_jsonl(tmp_path / "bad.jsonl", [*preference_rows(3, 0), {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"bad.jsonl:4: `chosen` and `rejected` are the same text"):
        train(resolve_paths(spec_from_dict(spec_for(tiny_model, bad, None, tmp_path / "b"))))
    assert not ray_down.is_initialized()


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_trainable_params_move_frozen_do_not(adapter, tiny_model, prefs, tmp_path):
    from ftray.data.encode import ensure_chat_template
    from ftray.models.adapters import apply_adapter
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_model, prefs[0], None, tmp_path, LORA if adapter == "lora" else None, output__merge=True))
    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    examples = [e for r in preference_rows(4, 0) for e in M.examples(r, tok, spec)]
    torch.manual_seed(0)
    model = apply_adapter(M.load_base(str(tiny_model), torch.float32, spec), spec.adapter, task_type=M.task_type).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA B starts at zero: A moves only from the second step on
        loss, info = M.loss(model, M.collate(examples, tok.pad_token_id))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert info["target_tokens"] == 4
    for n, p in model.named_parameters():
        assert (not torch.equal(before[n], p.detach())) == p.requires_grad, n
    if adapter == "lora":  # peft trains the new scalar head in full (SEQ_CLS modules_to_save)
        assert any("score" in n and p.requires_grad for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------ Ray


def test_zero3_lora_merged_is_served_as_reward_model(tiny_model, prefs, cache_dir, tmp_path, capsys):
    """In process, ZeRO-3 on one rank (the head and adapter partitioned, gathered to save and merge); ZeRO-3
    across 2 Ray workers: the other methods' tests."""
    from ftray.cli import main
    from ftray.serve.config import ScorerModel
    from ftray.serve.engine import ScorerEngine
    from ftray.serve.runs import config_from_runs
    out = tmp_path / "rm"
    d = spec_for(
        tiny_model, prefs[0], prefs[1], out, {**LORA, "target_modules": "all-linear"},
        output__merge=True, deepspeed__zero_stage=3, train__max_steps=8, data__cache_dir=str(cache_dir),
    )
    record = run_here(d)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "accuracy", "margin", "length_heuristic_accuracy", "balanced_accuracy", "balanced_pairs", "beats_length_heuristic"}
    assert a["eval_loss"] < b["eval_loss"] and a["accuracy"] > b["accuracy"] and a["accuracy"] >= 0.75, (b, a)

    # The run folder is a reward model for Serve as it is: `ftray serve RUN` makes it a `reward` scorer,
    # and the scorer engine (what the /v1/rewards replica runs) scores the held-out pairs as the run did.
    cfg = config_from_runs([str(out)])
    assert cfg["scorers"] == [{"name": "rm", "path": str(out), "kind": "reward"}] and cfg["generation"] == []
    engine = ScorerEngine(ScorerModel(name="rm", path=str(out), kind="reward", max_length=48))
    rows = read_checked(str(prefs[1]), "preference").rows
    item = lambda r, reply: {"messages": [*r["history"], {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": reply}]}  # noqa: E731
    chosen = [s["score"] for s in engine.run([item(r, r["chosen"]) for r in rows])]
    rejected = [s["score"] for s in engine.run([item(r, r["rejected"]) for r in rows])]
    acc = sum(float(c > r) + 0.5 * float(c == r) for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    assert acc == pytest.approx(a["accuracy"]) and margin == pytest.approx(a["margin"], abs=1e-3)

    assert main(["eval", str(out), "--data", str(prefs[1])]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["method"] == "reward" and line["accuracy"] == pytest.approx(a["accuracy"])


def test_shipped_job_validates(tiny_model):
    from ftray.config import load_spec
    from ftray.methods import check_method
    from ftray.train.launch import check_job

    needs_shared("preference", "oasst1_train.jsonl")
    spec = load_spec(ROOT / "jobs" / "reward.yaml", [f"model.path={tiny_model}"])
    assert spec.method.kind == "reward" and spec.data.format == "preference"
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)
    assert len(plan.train_rows.rows) == 542 and len(plan.eval_rows.rows) == 86


def test_ftray_eval_max_length_cuts_a_base_model_like_a_run(tiny_model, prefs):
    """`ftray eval --max-length`: a base model is judged on the cut a run was trained with: at 8 tokens each reply
    keeps its last 8 (its end, not the shared chat prefix: the pairs still differ), so the scores move."""
    from ftray.eval.evaluate import evaluate
    from ftray.methods.reward import cut_ids, render
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    rows = read_checked(str(prefs[1]), "preference").rows
    cuts = [[cut_ids(tok, render(tok, r, r[k]), 8) for k in ("chosen", "rejected")] for r in rows]
    assert all(c[1] and len(c[0]) == 8 for pair in cuts for c in pair)  # every reply cut
    assert all(pair[0][0] != pair[1][0] for pair in cuts)  # and no pair left the same tokens
    torch.manual_seed(0)
    full = evaluate(str(tiny_model), str(prefs[1]), method="reward")
    torch.manual_seed(0)
    cut = evaluate(str(tiny_model), str(prefs[1]), method="reward", max_length=8)
    assert full["margin"] != 0.0 and cut["margin"] != 0.0 and cut["margin"] != full["margin"], (full, cut)
    assert cut["length_heuristic_accuracy"] == full["length_heuristic_accuracy"]  # the same pairs, only cut


def test_a_long_conversation_loses_its_start_never_the_replies(tiny_model):
    """A pair whose history alone fills max_length: a cut on the right left both replies the same tokens (a forced
    tie); the cut keeps the end, so the two differ, each ends as its whole render does, and the Serve scorer's
    tokenizer cut (truncation on the left) gives the same ids."""
    from ftray.methods.reward import cut_ids, render
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    row = {"history": [{"role": "user", "content": "tell me " * 40}, {"role": "assistant", "content": "sure " * 40}],
           "prompt": "2+2=", "chosen": "4", "rejected": "5"}
    spec = spec_from_dict(spec_for(tiny_model, "x.jsonl", None, "out", data__max_length=24))
    (e,) = get_method("reward").examples(row, tok, spec)
    assert e["truncated"] and len(e["input_ids"]) == len(e["rejected_ids"]) == 24
    assert e["input_ids"] != e["rejected_ids"]
    for ids, reply in ((e["input_ids"], "4"), (e["rejected_ids"], "5")):
        whole = tok(render(tok, row, reply))["input_ids"]
        assert ids[-20:] == whole[-20:] and len(whole) > 24  # the end kept (special tokens the tokenizer adds stay)
        tok.truncation_side = "left"  # as ScorerEngine sets it for a reward scorer
        assert tok(render(tok, row, reply), truncation=True, max_length=24)["input_ids"] == ids
        tok.truncation_side = "right"
    assert cut_ids(tok, "short", 24) == (tok("short")["input_ids"], False)
