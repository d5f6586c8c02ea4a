"""The length-only baseline beside every preference figure (issue 15 item 1): the heuristic "the longer reply
is the chosen one" and the length-balanced subset, by hand; then `reward` and `dpo` evaluation on a tiny
model in this process (and `ftray eval`) reporting them beside their own accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftray.config import spec_from_dict
from ftray.data.encode import ensure_chat_template
from ftray.methods import EvalContext, get_method
from ftray.metrics import length_baseline, length_keys, length_summary
from tests._methods_tiny import write_jsonl
from tests._specs import method_spec


def pair(chosen_len: int, rejected_len: int) -> dict:
    return {"prompt": "1+1=", "chosen": "c" * chosen_len, "rejected": "r" * rejected_len}


def test_length_baseline_by_hand():
    rows = [
        pair(10, 5),  # longer chosen: right; 5 apart > 20 % of 10: not balanced
        pair(3, 8),  # shorter chosen: wrong; not balanced
        pair(4, 4),  # a tie: half; balanced
        pair(9, 10),  # wrong; 1 <= 2: balanced
        pair(12, 10),  # right; 2 <= 2.4: balanced
        pair(10, 8),  # right; 2 <= 2.0: balanced (the bound is inclusive)
        pair(10, 7),  # right; 3 > 2: not balanced
    ]
    acc, balanced = length_baseline(rows)
    assert acc == pytest.approx(4.5 / 7)
    assert balanced == [2, 3, 4, 5]
    acc, balanced = length_baseline([])
    assert math.isnan(acc) and balanced == []


def test_length_keys_average_to_the_balanced_accuracy():
    rows = [pair(10, 5), pair(4, 4), pair(9, 10), pair(12, 10)]
    model = [0.0, 1.0, 0.5, 1.0]  # the model's pairwise correctness per row (0.5: tied scores)
    per_row = [{"accuracy": c, **length_keys(r, c)} for r, c in zip(rows, model, strict=True)]
    assert [p["length_correct"] for p in per_row] == [1.0, 0.5, 0.0, 1.0]
    assert [p["balanced"] for p in per_row] == [0.0, 1.0, 1.0, 1.0]
    means = {k: sum(p[k] for p in per_row) / len(per_row) for k in per_row[0]}  # what the loop hands over
    out = length_summary(means, "accuracy")
    assert out == {
        "accuracy": pytest.approx(2.5 / 4),
        "length_heuristic_accuracy": pytest.approx(2.5 / 4),
        "balanced_accuracy": pytest.approx((1.0 + 0.5 + 1.0) / 3),
        "balanced_pairs": pytest.approx(3 / 4),
        "beats_length_heuristic": 0.0,  # equal is not above
    }
    none = length_summary({"accuracy": 1.0, "length_correct": 0.0, "balanced": 0.0, "balanced_correct": 0.0}, "accuracy")
    assert math.isnan(none["balanced_accuracy"]) and none["balanced_pairs"] == 0 and none["beats_length_heuristic"] == 1.0


# Replies of digits the tiny tokenizer knows; lengths chosen so that both sides of each test are hit.
ROWS = [
    {"prompt": "2+3=", "chosen": "5", "rejected": "6"},  # tie, balanced
    {"prompt": "12+7=", "chosen": "19", "rejected": "191919"},  # wrong, not balanced
    {"prompt": "4+4=", "chosen": "8 8 8 8", "rejected": "9"},  # right, not balanced
    {"prompt": "10+10=", "chosen": "20 20", "rejected": "21 21"},  # tie, balanced
    {"prompt": "5+5=", "chosen": "10 10 10", "rejected": "11 11 11 1"},  # wrong, balanced
    {"prompt": "6+6=", "chosen": "12 12 12 12", "rejected": "13 13 13"},  # right, not balanced
    {"prompt": "7+7=", "chosen": "14 14 14 14 1", "rejected": "15 15 15 15"},  # right, balanced
]
ACCURACY = {"reward": "accuracy", "dpo": "reward_accuracy"}  # each method's own pairwise accuracy


def _scored(kind: str, tiny_model, tmp_path, move: bool):
    """The method, its spec on ROWS, the tokenizer and the tiny model it loads; `move`: every weight pushed off
    its start (dpo: the policy off its reference, else every implicit reward ties at 0)."""
    from ftray.models.load import load_tokenizer

    m = get_method(kind)
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    spec = spec_from_dict(method_spec(kind, tiny_model, data, None, tmp_path, {"kind": "full"}))
    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    torch.manual_seed(0)
    model = m.load_base(str(tiny_model), torch.float32, spec).eval()
    if move:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    return m, spec, tok, model


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_score_rows_and_summarize_report_the_baselines(kind, tiny_model, tmp_path):
    acc_key = ACCURACY[kind]
    m, spec, tok, model = _scored(kind, tiny_model, tmp_path, move=kind == "dpo")
    scores = m.score_rows(model, tok, ROWS, spec, EvalContext())
    heuristic, balanced = length_baseline(ROWS)
    assert [s["length_correct"] for s in scores] == [0.5, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0]
    assert [i for i, s in enumerate(scores) if s["balanced"]] == balanced == [0, 3, 4, 6]
    correct = [s[acc_key] for s in scores]
    assert len(set(correct)) > 1, correct  # the model does rank pairs, so the subset's figure means something

    means = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
    out = m.summarize(1.0, means)
    assert out["length_heuristic_accuracy"] == pytest.approx(heuristic)
    assert out["balanced_accuracy"] == pytest.approx(sum(correct[i] for i in balanced) / len(balanced))
    assert out["balanced_pairs"] == pytest.approx(4 / 7)
    assert out["beats_length_heuristic"] == float(out[acc_key] > heuristic)
    assert out[acc_key] == pytest.approx(sum(correct) / len(correct)) and out["eval_loss"] == 1.0
    assert not {"length_correct", "balanced", "balanced_correct"} & set(out)


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_ftray_eval_prints_the_baselines(kind, tiny_model, tmp_path, capsys):
    from ftray.cli import main

    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    assert main(["eval", str(tiny_model), "--data", str(data), "--method", kind]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["rows"] == 7 and got["length_heuristic_accuracy"] == pytest.approx(4 / 7)
    assert got["balanced_pairs"] == pytest.approx(4 / 7) and 0 <= got["balanced_accuracy"] <= 1
    assert got["beats_length_heuristic"] in (0.0, 1.0) and ACCURACY[kind] in got


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_held_out_loss_comes_from_the_forwards_that_score_the_rows(kind, tiny_model, tmp_path):
    """`scores_carry_loss`: the held-out evaluation of a preference method takes its loss from the forwards that
    score each pair (one pass over the pairs, not two); the figure is the one the separate loss pass gives."""
    from ftray.train.held_out import evaluate_held_out

    m, spec, tok, model = _scored(kind, tiny_model, tmp_path, move=True)  # dpo off its reference; reward ranking
    assert m.scores_carry_loss
    nets = [model] + ([m.reference.copy] if kind == "dpo" else [])
    calls = [0]
    for net in nets:
        net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    examples = [{**e, "position_ids": None} for r in ROWS for e in m.examples(r, tok, spec)]

    one_pass = evaluate_held_out(m, model, examples, ROWS, tok, spec, EvalContext(), micro_batch=3)
    calls_one, calls[0] = calls[0], 0
    m.scores_carry_loss = False  # this instance only: the loss pass over the examples, then the scores
    two_passes = evaluate_held_out(m, model, examples, ROWS, tok, spec, EvalContext(), micro_batch=3)
    # Off, the rows' own loss passes through beside the loss pass's figure: the two agree.
    assert two_passes.pop("loss") == pytest.approx(two_passes["eval_loss"], rel=1e-5)
    assert one_pass.keys() == two_passes.keys() and "loss" not in one_pass
    for k, v in two_passes.items():
        assert one_pass[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert one_pass["eval_loss"] > 0
    # 7 pairs: the scores run one batch of 16 pairs (per net), the loss pass ceil(7 / 3) = 3 more
    assert calls_one == len(nets) and calls[0] == 4 * len(nets), (calls_one, calls[0])
