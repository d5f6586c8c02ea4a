"""The loop's parts, each without Ray (issue 19 item 7): the held-out evaluation (its shares on two ranks
add up to the one-process figure, which is what `ftray eval` reports), one checkpoint written and read back
into a DeepSpeed engine (weights, optimizer, RNG, step, history, the method's state), and the step record
and console line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ftray.config import spec_from_dict
from ftray.data.encode import ensure_chat_template
from ftray.methods import EvalContext, get_method
from tests._specs import job_dict


@pytest.fixture(scope="module")
def sft(tiny_model, arith, tmp_path_factory):
    from ftray.models.load import load_tokenizer

    out = tmp_path_factory.mktemp("loop-parts")
    spec = spec_from_dict(job_dict(tiny_model, arith[0], arith[1], out, out / "cache", scaling__num_workers=1,
                                   train__max_steps=4, train__global_batch_size=4, train__micro_batch_size=2,
                                   method__exact_match=True))
    tok = load_tokenizer(str(tiny_model))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in arith[1].read_text().splitlines()[:10]]
    m = get_method("sft")
    examples = [{**e, "position_ids": None} for r in rows for e in m.examples(r, tok, spec)]
    return spec, tok, rows, examples


def test_held_out_shares_of_two_ranks_add_up_to_one_process(sft, tiny_model):
    from ftray.train.held_out import evaluate_held_out

    spec, tok, rows, examples = sft
    m = get_method("sft")
    torch.manual_seed(0)
    model = m.load_base(str(tiny_model), torch.float32, spec).train()
    whole = evaluate_held_out(m, model, examples, rows, tok, spec, EvalContext(), micro_batch=3)
    assert model.training  # the mode it came in with
    assert set(whole) >= {"eval_loss", "exact_match"} and whole["eval_loss"] > 0

    sent: dict[int, list[list[float]]] = {0: [], 1: []}
    for rank in (0, 1):  # each rank's numbers, as it hands them to the all-reduce
        def keep(values, rank=rank):
            sent[rank].append(list(values))
            return values

        evaluate_held_out(m, model, examples, rows, tok, spec, EvalContext(), micro_batch=3, rank=rank, world=2,
                          all_sum=keep)
    (loss0, tok0), (loss1, tok1) = sent[0][0], sent[1][0]
    assert tok0 > 0 and tok1 > 0  # 10 examples dealt 5 and 5
    assert (loss0 + loss1) / (tok0 + tok1) == pytest.approx(whole["eval_loss"], rel=1e-6)
    # The rows' scores: the two ranks' sums and counts (rows dealt 5 and 5) give the one-process mean.
    *s0, n0 = sent[0][1]
    *s1, n1 = sent[1][1]
    assert n0 + n1 == len(rows)
    assert (s0[0] + s1[0]) / len(rows) == pytest.approx(whole["exact_match"])  # score_rows' one key


def test_checkpoint_restores_weights_optimizer_rng_and_state(sft, tiny_model, tmp_path):
    import deepspeed

    from ftray.models.load import resolve
    from ftray.train import checkpoint
    from ftray.train.local import one_rank_environment
    from ftray.train.loop import _skip_shm_allreduce_op, build_engine, lr_lambda, train_step

    spec, tok, _, examples = sft
    for e in examples:
        e["tokens"] = len(e["input_ids"])
    m = get_method("sft")
    with one_rank_environment():
        _skip_shm_allreduce_op()  # as run_worker: no JIT build of an op training never calls
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        engine, scheduler, groups, summary = build_engine(m, spec, resolve(str(tiny_model)), torch.float32, 4, 1, "fp32",
                                                          lr_lambda(spec, 4))
        try:
            assert 0 < summary["trainable_params"] < summary["total_params"]
            loss1, n1, _ = train_step(engine, m, 0, [examples[:2], examples[2:4]], tok.pad_token_id, "cpu")
            assert n1 == sum(len(e["input_ids"]) for e in examples[:4]) and math.isfinite(loss1)
            saved = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
            checkpoint.save(engine, tmp_path, 0, 1, [{"step": 1, "loss": loss1}], {"kl_coef": 0.25})
            draw = torch.rand(3)
            train_step(engine, m, 1, [examples[4:6], examples[6:8]], tok.pad_token_id, "cpu")
            moved = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
            assert any(not torch.equal(saved[n], moved[n]) for n in saved)

            back = checkpoint.restore(engine, tmp_path, 0)
            assert (back.step, back.history, back.method_state, back.optimizer_steps) == (
                1, [{"step": 1, "loss": loss1}], {"kl_coef": 0.25}, 1)
            assert all(torch.equal(saved[n], p.detach()) for n, p in engine.module.named_parameters() if p.requires_grad)
            assert torch.equal(torch.rand(3), draw)  # the RNG is where it was when the checkpoint was taken
            # The same step again from the restored state: the same weights as the first time.
            train_step(engine, m, 1, [examples[4:6], examples[6:8]], tok.pad_token_id, "cpu")
            again = {n: p.detach() for n, p in engine.module.named_parameters() if p.requires_grad}
            assert all(torch.allclose(moved[n], again[n], atol=1e-7) for n in moved)
        finally:
            engine.destroy()


def test_step_record_info_and_console_line():
    from ftray.train.loop import combine_step_info, step_line, step_record

    parts = [{"target_tokens": 4, "reward_min": 0.1, "reward_max": 0.5, "generate_s": 0.2, "kl": 0.1},
             {"target_tokens": 4, "reward_min": 0.0, "reward_max": 0.9, "generate_s": 0.3, "kl": 0.3}]
    info = combine_step_info(parts)
    assert info == pytest.approx({"reward_min": 0.0, "reward_max": 0.9, "generate_s": 0.5, "kl": 0.2})
    rec = step_record(3, 1.5, 1e-3, 64.0, 2.0, info)
    assert rec["step"] == 3 and rec["train/generate_s"] == pytest.approx(0.5)
    assert rec["train/generate_share"] == pytest.approx(0.25) and "train/target_tokens" not in rec
    line = step_line({**rec, "eval/eval_loss": 1.25}, 10, 1234.4, 3725)
    assert line.startswith("[ftray] step 3/10 loss 1.5000 lr 1.00e-03 tok/s 1,234 eta 1:02:05")
    assert "train/kl 0.2" in line and "eval/eval_loss 1.25" in line


def test_each_step_reads_the_same_examples_on_any_number_of_workers():
    """The data position a resume on another number of workers relies on (issue 16 item 1): the rows of a step
    are those of the global batch at that step, each once, however ranks and micro-batches split it; so a run
    resumed at step s on another world size skips and repeats nothing (tests/test_train.py resumes one)."""
    from ftray.train.loop import _Order, sample_index

    grouped = _Order(37, seed=3, lengths=[(7 * i) % 23 + 1 for i in range(37)], batch=8)  # train.group_by_length
    for order, gbs in ((_Order(37, seed=3), 8), (grouped, 8)):
        _same_rows_per_step(order, gbs, sample_index)


def _same_rows_per_step(order, gbs, sample_index):
    for step in range(12):  # past an epoch boundary (37 rows)
        seen = {}
        for world, mb in ((1, 8), (1, 2), (2, 4), (2, 2), (4, 1), (8, 1)):
            accum = gbs // (world * mb)
            rows = [order(sample_index(step, m, r, j, world, mb, gbs))
                    for m in range(accum) for r in range(world) for j in range(mb)]
            seen[(world, mb)] = sorted(rows)
        assert len(set(map(tuple, seen.values()))) == 1, (step, seen)
        assert len(seen[(1, 8)]) == gbs


def test_grouped_order_puts_rows_of_one_length_in_a_micro_batch_and_is_a_function_of_position():
    """`train.group_by_length`: each window of 8 steps holds the rows the plain shuffle puts there, sorted by
    length into its steps and the steps shuffled; micro-batches of 8 then carry ~5 % padding instead of ~46 %
    (lengths uniform in 1..256). Reading the positions backwards (a resume) gives the same rows."""
    import random

    from ftray.train.loop import _Order, sample_index

    rng = random.Random(0)
    n, gbs, mb = 500, 16, 8
    lengths = [rng.randint(1, 256) for _ in range(n)]
    plain, grouped = _Order(n, seed=5), _Order(n, seed=5, lengths=lengths, batch=gbs)
    span = gbs * 8
    for w in range(6):  # past an epoch boundary
        window = range(w * span, (w + 1) * span)
        assert sorted(grouped(g) for g in window) == sorted(plain(g) for g in window)

    def padding(order) -> float:
        real = padded = 0
        for step in range(40):
            for m in range(gbs // mb):
                ls = [lengths[order(sample_index(step, m, 0, j, 1, mb, gbs))] for j in range(mb)]
                real, padded = real + sum(ls), padded + max(ls) * mb
        return 1 - real / padded

    assert padding(plain) > 0.3 and padding(grouped) < 0.1, (padding(plain), padding(grouped))
    firsts = [max(lengths[grouped(s * gbs + j)] for j in range(gbs)) for s in range(8)]
    assert firsts != sorted(firsts, reverse=True)  # the window's steps are shuffled, not longest first
    again = _Order(n, seed=5, lengths=lengths, batch=gbs)
    assert [again(g) for g in reversed(range(4 * span))] == [grouped(g) for g in reversed(range(4 * span))]
    other = _Order(n, seed=6, lengths=lengths, batch=gbs)
    assert [other(g) for g in range(span)] != [grouped(g) for g in range(span)]


def test_checkpoint_folders_left_by_dead_workers_are_swept(tmp_path):
    """A worker killed between writing a checkpoint and storing it leaves its temporary folder (a whole checkpoint)
    behind; the next worker's start on the node removes the folders of processes that are gone, never a live
    process's (this one's, or a running sibling's) nor a folder it cannot attribute."""
    import os
    import subprocess
    import sys

    from ftray.train.loop import checkpoint_tmpdir, sweep_orphan_checkpoints

    make = f"from ftray.train.loop import checkpoint_tmpdir; print(checkpoint_tmpdir(1, {str(tmp_path)!r}))"
    dead = subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, check=True)
    orphan = dead.stdout.strip().splitlines()[-1]
    sibling = subprocess.Popen([sys.executable, "-c", make + "; import time; time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        live = sibling.stdout.readline().strip()
        mine = checkpoint_tmpdir(0, str(tmp_path))
        unknown = tmp_path / "ftray-ckpt-r0-x1y2z3"  # the naming before pids: kept
        for d in (orphan, live, mine, unknown):
            os.makedirs(os.path.join(d, "ds"), exist_ok=True)
            with open(os.path.join(d, "ds", "mp_rank_00_model_states.pt"), "wb") as f:
                f.write(b"\0" * 1024)
        assert sweep_orphan_checkpoints(str(tmp_path)) == [orphan]
        assert not os.path.exists(orphan)
        assert all(os.path.exists(d) for d in (live, mine, unknown))
        assert sweep_orphan_checkpoints(str(tmp_path)) == []
    finally:
        sibling.kill()
        sibling.wait()
    assert sweep_orphan_checkpoints(str(tmp_path)) == [live]  # the sibling is gone now


def test_a_checkpoint_waits_for_the_one_before_to_finish_uploading(tmp_path):
    """At most one checkpoint per worker uploads in the background: the next due one waits until Ray Train has
    deleted the previous folder (uploaded), so a slow store cannot queue checkpoints behind the steps; a folder
    that never goes (a failed upload, which Ray raises at the next report) holds it `timeout_s` at most."""
    import threading

    from ftray.train.loop import checkpoint_tmpdir, wait_for_upload

    assert wait_for_upload(None) < 0.05
    folder = checkpoint_tmpdir(0, str(tmp_path))
    (folder / "state.json").write_text("{}")
    threading.Timer(0.6, lambda: __import__("shutil").rmtree(folder)).start()
    waited = wait_for_upload(folder)
    assert 0.5 < waited < 5 and not folder.exists()
    stuck = checkpoint_tmpdir(0, str(tmp_path))
    assert 0.3 <= wait_for_upload(stuck, timeout_s=0.3) < 2 and stuck.exists()
