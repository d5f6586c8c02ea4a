"""A run is served as what its method made it (run.json's `spec.method.kind`, read through RunFolder):
classify (LoRA) → a classifier with its label names, reward (LoRA) → a reward model, contrastive (full) →
embeddings, sft → a generation adapter; masked_lm, sentence_order and seq2seq runs are refused with the
reason. The scorer engine behind /v1/classify, /v1/rewards and /v1/embeddings gives the outputs of the run's
own model (loaded as `ftray eval` loads it), adapter included. In process, no Ray: the HTTP layer over
these engines is tests/test_serve.py's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftray.models.load import ModelError
from ftray.runs import RunFolder
from ftray.serve.config import ScorerModel
from ftray.serve.engine import ScorerEngine
from ftray.serve.runs import config_from_runs
from tests._methods_tiny import pairs_task, sign_task
from tests._preference import preference_task
from tests._specs import method_spec

TEXTS = ["big big big", "small", "a b c d e f"]


@pytest.fixture(scope="module")
def method_runs(work, tiny_model, tiny_bert, cache_dir, runs) -> dict[str, Path]:
    signs, prefs, pairs = sign_task(work / "sbm-signs"), preference_task(work / "sbm-prefs"), pairs_task(work / "sbm-pairs")
    jobs = {
        "classify-lora": method_spec("classify", tiny_bert, signs[0], signs[1], None,
                                     {"kind": "lora", "r": 4, "target_modules": ["query", "value"]}, train__max_steps=2),
        "reward-lora": method_spec("reward", tiny_model, prefs[0], prefs[1], None,
                                   {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, train__max_steps=2,
                                   output__merge=True),  # a reward adapter is served merged (check_job says so)
        "contrastive-full": method_spec("contrastive", tiny_bert, pairs[0], pairs[1], None, {"kind": "full"}, train__max_steps=2),
    }
    out = {}
    for name, d in jobs.items():
        d["data"]["cache_dir"] = str(cache_dir)
        out[name] = runs.get(d)[1]
    return out


def _run_model(run: Path):
    """The run's own model as `ftray eval` loads it: the method's base (head, labels) + the adapter, not merged."""
    from ftray.methods import load_run_model
    from ftray.models.load import resolve

    return load_run_model(RunFolder(str(run)).spec(), resolve(str(run))).eval()


def _inputs(engine: ScorerEngine, texts):
    enc = engine.tokenizer([engine.text(t) for t in texts], padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def test_config_dispatches_on_the_runs_method(method_runs, tiny_model, work):
    from tests._serve_models import make_adapter_run

    sft = make_adapter_run(tiny_model, work / "sbm-sft", seed=3)
    cfg = config_from_runs([str(sft), *(str(p) for p in method_runs.values())])
    kinds = {s["name"]: s["kind"] for s in cfg["scorers"]}
    names = {n: Path(p).name for n, p in method_runs.items()}
    assert kinds == {names["classify-lora"]: "classifier", names["reward-lora"]: "reward", names["contrastive-full"]: "embedding"}
    # The LoRA classifier and reward model are not taken for generation adapters of their bases.
    assert [g["base"] for g in cfg["generation"]] == [str(tiny_model)]
    assert list(cfg["generation"][0]["adapters"]) == ["sbm-sft"]


@pytest.mark.parametrize("kind, says", [
    ("masked_lm", "fills in masked tokens"),
    ("sentence_order", "how a text's sentences were shuffled"),
    ("seq2seq", "encoder-decoder"),
])
def test_runs_that_are_not_served_are_refused_with_the_reason(kind, says, method_runs, tmp_path):
    run = tmp_path / f"{kind}-run"
    shutil.copytree(method_runs["contrastive-full"], run)
    rec = RunFolder(str(run)).record()
    rec["spec"]["method"] = {"kind": kind}
    RunFolder(str(run)).write_record(rec)
    with pytest.raises(ModelError, match=rf"^run {run}: a `{kind}` run is not served: .*{says}"):
        config_from_runs([str(run)])


def test_lora_classifier_serves_the_runs_probabilities_and_labels(method_runs):
    run = method_runs["classify-lora"]
    engine = ScorerEngine(ScorerModel(name="cls", path=str(run), kind="classifier"))
    got = engine.run(TEXTS)
    own = _run_model(run)
    with torch.no_grad():
        probs = own(**_inputs(engine, TEXTS)).logits.softmax(-1)
    labels = [own.config.id2label[i] for i in range(probs.shape[-1])]
    assert sorted(labels) == ["big", "small"]
    for row, p in zip(got, probs.tolist(), strict=True):
        assert set(row["scores"]) == set(labels)
        assert max(abs(row["scores"][lab] - q) for lab, q in zip(labels, p, strict=True)) < 1e-5
    # Not the untrained head: the adapter's head was loaded (its scores differ from a fresh head's).
    record = RunFolder(str(run)).record()
    assert record["spec"]["adapter"]["kind"] == "lora"


def test_lora_reward_model_serves_the_runs_scores(method_runs):
    """The reward adapter merged into its base at the end of training (`merged/`, which serving loads)
    scores as the run's own base + adapter."""
    run = method_runs["reward-lora"]
    engine = ScorerEngine(ScorerModel(name="rm", path=str(run), kind="reward"))
    items = [{"prompt": "2+2=", "response": "4"}, {"prompt": "2+2=", "response": "five"}]
    got = [r["score"] for r in engine.run(items)]
    with torch.no_grad():
        want = _run_model(run)(**_inputs(engine, items)).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    # The trained adapter is in it: the bare base with a fresh 1-label head scores otherwise.
    from transformers import AutoModelForSequenceClassification

    bare = AutoModelForSequenceClassification.from_pretrained(json.loads((run / "run.json").read_text())["base_model"], num_labels=1)
    bare.config.pad_token_id = engine.tokenizer.pad_token_id
    with torch.no_grad():
        fresh = bare.eval()(**_inputs(engine, items)).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(got, fresh, strict=True)) > 1e-4


def test_contrastive_run_serves_its_embeddings(method_runs):
    run = method_runs["contrastive-full"]
    engine = ScorerEngine(ScorerModel(name="emb", path=str(run), kind="embedding"))
    got = torch.tensor([r["embedding"] for r in engine.run(TEXTS)])
    own = _run_model(run)
    enc = _inputs(engine, TEXTS)
    with torch.no_grad():
        h = own(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert (got - want).abs().max().item() < 1e-5
