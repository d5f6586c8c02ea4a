"""A run is served as what its method made it (run.json's `spec.method.kind`, read through RunFolder):
classify → a classifier with its label names, reward → a reward model, contrastive and cluster →
embeddings (each LoRA or full), sft → a generation adapter; masked_lm, sentence_order and seq2seq runs are refused with the
reason. The scorer engine behind /v1/classify, /v1/rewards and /v1/embeddings gives the outputs of the run's
own model (loaded as `ftray eval` loads it), adapter included. In process, no Ray: the HTTP layer over
these engines is tests/test_serve.py's, which serves these same runs (conftest's `method_runs`) over HTTP."""

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
from tests._serve_models import engine_inputs, run_model

TEXTS = ["big big big", "small", "a b c d e f"]


def test_config_dispatches_on_the_runs_method(method_runs, tiny_model, work):
    from tests._serve_models import make_adapter_run, make_full_run

    gen = [make_adapter_run(tiny_model, work / f"sbm-{k}", seed=3, kind=k) for k in ("sft", "causal_lm", "dpo", "grpo", "ppo")]
    full = make_full_run(tiny_model, work / "sbm-dpo-full", "dpo")
    cfg = config_from_runs([*(str(p) for p in gen), str(full), *(str(p) for p in method_runs.values())])
    kinds = {s["name"]: s["kind"] for s in cfg["scorers"]}
    names = {n: Path(p).name for n, p in method_runs.items()}
    want = {"classify": "classifier", "reward": "reward", "contrastive": "embedding", "cluster": "embedding"}
    assert kinds == {names[n]: want[n.split("-")[0]] for n in method_runs}  # full and LoRA alike
    # The feedback and LM methods' adapters are generation adapters of their base (the LoRA classifier and
    # reward model are not); a full run is a generation model of its own.
    assert [g["base"] for g in cfg["generation"]] == [str(tiny_model), str(full)]
    assert list(cfg["generation"][0]["adapters"]) == ["sbm-sft", "sbm-causal_lm", "sbm-dpo", "sbm-grpo", "sbm-ppo"]
    assert cfg["generation"][1]["adapters"] == {}


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


def test_lora_reward_model_serves_the_runs_scores(method_runs):
    """The reward adapter merged into its base at the end of training (`merged/`, which serving loads)
    scores as the run's own base + adapter."""
    run = method_runs["reward-lora"]
    engine = ScorerEngine(ScorerModel(name="rm", path=str(run), kind="reward"))
    items = [{"prompt": "2+2=", "response": "4"}, {"prompt": "2+2=", "response": "five"}]
    got = [r["score"] for r in engine.run(items)]
    with torch.no_grad():
        want = run_model(run)(**engine_inputs(engine, items)).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    # The trained adapter is in it: the bare base with a fresh 1-label head scores otherwise.
    from transformers import AutoModelForSequenceClassification

    bare = AutoModelForSequenceClassification.from_pretrained(json.loads((run / "run.json").read_text())["base_model"], num_labels=1)
    bare.config.pad_token_id = engine.tokenizer.pad_token_id
    with torch.no_grad():
        fresh = bare.eval()(**engine_inputs(engine, items)).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(got, fresh, strict=True)) > 1e-4


SCORER_KIND = {"classify": "classifier", "reward": "reward", "contrastive": "embedding", "cluster": "embedding"}


@pytest.mark.parametrize("name", ["classify-lora", "classify-full", "reward-lora", "reward-full", "contrastive-full",
                                  "contrastive-lora", "cluster-full"])
def test_every_scorer_run_serves_its_own_models_outputs(name, method_runs):
    """Each method x adapter row: the engine `ftray serve RUN` builds (kind from run.json) gives the run's own
    model's outputs (class probabilities by label name, scores, embeddings)."""
    from tests._serve_models import expected_outputs

    run = method_runs[name]
    (sc,) = config_from_runs([str(run)])["scorers"]
    assert sc["kind"] == SCORER_KIND[name.split("-")[0]]
    items = [{"prompt": "2+2=", "response": "4"}, {"prompt": "2+2=", "response": "five"}] if sc["kind"] == "reward" else TEXTS
    got = ScorerEngine(ScorerModel(name=sc["name"], path=sc["path"], kind=sc["kind"])).run(items)
    want = expected_outputs(run, sc["kind"], items)
    for g, w in zip(got, want, strict=True):
        if sc["kind"] == "classifier":
            assert g["scores"] == pytest.approx(w, abs=1e-5) and sorted(w) == ["big", "small"]
        elif sc["kind"] == "reward":
            assert g["score"] == pytest.approx(w, abs=1e-5)
        else:
            assert g["embedding"] == pytest.approx(w, abs=1e-5)
