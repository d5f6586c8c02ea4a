"""Integration: real Ray Train workers running DeepSpeed (gloo, CPU) on a tiny Llama."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ftray.config import resolve_paths, spec_from_dict
from ftray.train.launch import check_job, fit_job
from tests._specs import ROOT, assert_no_credentials_in_runtime_envs, job_dict, needs_shared, run_here

pytestmark = pytest.mark.integration


def run_job(d: dict) -> dict:
    from ftray.train.launch import train

    return train(resolve_paths(spec_from_dict(d)))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter_weights(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, tiny_model, arith, cache_dir, ray_local):
    """The same 10-step job under ZeRO 2 and 3 on 2 Ray workers, on 1 Ray worker x 2 accumulation steps,
    and under ZeRO-0 in this process (1 rank: no partitioning to compare, the plain optimizer step)."""
    base = tmp_path_factory.mktemp("equiv")
    # A checkpoint at step 5 of each: the resumes on another number of workers below start from it.
    runs = {"_job": lambda out, **over: job_dict(tiny_model, arith[0], arith[1], out, cache_dir, train__max_steps=10,
                                                 train__checkpoint_every=5, **over)}
    for name, over in {
        "zero2": {"deepspeed__zero_stage": 2},
        "zero3": {"deepspeed__zero_stage": 3},
    }.items():
        runs[name] = (run_job(runs["_job"](base / name, **over)), base / name)
    # One rank in this process: the loop a 1-worker Ray Train job runs (the same curve within 1e-6:
    # tests/test_tune.py `test_best_yaml_reproduces_the_trial`, a 1-worker trial rerun in process).
    one = runs["_job"](base / "one_worker", deepspeed__zero_stage=2, scaling__num_workers=1)
    runs["one_worker"] = (run_here(one), base / "one_worker")
    runs["zero0"] = (run_here(runs["_job"](base / "zero0", deepspeed__zero_stage=0)), base / "zero0")
    return runs


def test_loss_curves_equal_across_zero_stages(equivalence_runs):
    ref = losses(equivalence_runs["zero2"][1])
    assert len(ref) == 10 and ref[-1] < ref[0]
    for name in ("zero0", "zero3"):
        other = losses(equivalence_runs[name][1])
        assert max(abs(a - b) for a, b in zip(ref, other, strict=True)) < 1e-4, (name, ref, other)


def test_one_worker_accumulating_equals_two_workers(equivalence_runs):
    record, run = equivalence_runs["one_worker"]
    assert record["spec"]["scaling"]["num_workers"] == 1
    two = losses(equivalence_runs["zero2"][1])
    one = losses(run)
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-4, (one, two)


def test_zero3_adapter_is_complete_and_reloads_in_fresh_process(equivalence_runs, tiny_model):
    record, run = equivalence_runs["zero3"]
    w = adapter_weights(run)
    # 2 layers x (q_proj, v_proj) x (A, B), nothing empty, B trained away from its zero init.
    assert len(w) == 8 and all(t.numel() > 0 for t in w.values())
    assert all(t.abs().sum() > 0 for k, t in w.items() if "lora_B" in k)
    z2 = adapter_weights(equivalence_runs["zero2"][1])
    assert max((w[k] - z2[k]).abs().max().item() for k in w) < 1e-4
    # A fresh process: PeftModel.from_pretrained + the same held-out data -> the eval loss the run
    # measured at the end of training (a function of every held-out logit).
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_reload_eval.py"), str(tiny_model), str(run)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout.strip().splitlines()[-1])["eval_loss"]
    assert abs(fresh - record["eval"]["after"]["eval_loss"]) < 1e-5, (fresh, record["eval"]["after"])


def test_an_embedded_ray_starts_no_preemption_watcher(equivalence_runs):
    """The fits above ran on this session's Ray with the settings `ftray train` gives an embedded Ray
    (`EMBEDDED_RAY_ENV`, tests/conftest.py): their controllers started no preemption watcher. The state API lists
    finished actors too, and without the variable a 1-worker fit lists one (checked by hand once). Fails when
    Ray Train renames the variable or stops reading it."""
    from ray.util.state import list_actors

    classes = {a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker"} <= classes, classes
    assert "PreemptionWatcher" not in classes, classes


def test_run_folder_contents(equivalence_runs):
    record, run = equivalence_runs["zero2"]
    for name in ("run.json", "metrics.jsonl", "curves.png", "adapter/adapter_config.json", "tokenizer/tokenizer.json"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert record["status"] == "completed" and record["data_hash"] and record["versions"]["deepspeed"]
    assert record["eval"]["after"]["eval_loss"] < record["eval"]["before"]["eval_loss"]
    # r=4 on q_proj (64 -> 64) and v_proj (64 -> 2 kv heads x 16 = 32), 2 layers: A is r x in, B is out x r.
    assert record["trainable"]["trainable_params"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    # Where each rank ran: one local node here, so PACK (the default) puts both ranks on it.
    place = record["placement"]
    assert place["strategy"] == "PACK" and [r["rank"] for r in place["ranks"]] == [0, 1], place
    assert len({r["node_id"] for r in place["ranks"]}) == 1 and all(r["node_ip"] and r["hostname"] for r in place["ranks"])
    assert json.loads((run / "run.json").read_text())["placement"] == place


# ----------------------------------------------------------------------------- resume on another number of workers


def _checkpoint_at(run: Path, step: int) -> Path:
    """The run's checkpoint folder at `step` (Ray Train's are named by time, the in-process loop's by step)."""
    found = [c for c in (run / "checkpoints").glob("checkpoint_*")
             if (c / "state.json").exists() and json.loads((c / "state.json").read_text())["step"] == step]
    assert len(found) == 1, (run, step, found)
    return found[0]


@pytest.fixture(scope="module")
def one_worker_zero3(equivalence_runs):
    """The equivalence job on 1 worker under ZeRO-3, in this process (as `one_worker` is under ZeRO-2)."""
    run = equivalence_runs["zero2"][1].parent / "one_worker_zero3"
    run_here(equivalence_runs["_job"](run, deepspeed__zero_stage=3, scaling__num_workers=1))
    return run


# 1 -> 2 under ZeRO-3 only: each 2-worker resume is a Ray Train start (~25 s on this machine). A ZeRO-2 state
# saved on another world size goes through the same branch of ftray/train/checkpoint.py (`_load_resharded`; 2 -> 1 here).
@pytest.mark.parametrize(("zero", "direction"), [(2, "2to1"), (3, "2to1"), (3, "1to2")])
def test_resume_on_another_number_of_workers(equivalence_runs, one_worker_zero3, tmp_path, ray_local, zero, direction):
    """Issue 16 item 1: a checkpoint taken on 2 workers resumes on 1 (ZeRO-2 and ZeRO-3) and one taken on 1 resumes
    on 2 (ZeRO-3) (the partitioned optimizer state is resharded through DeepSpeed's universal checkpoint). The
    optimizer's state came along (its step count), each later step trained on the examples the uninterrupted
    run at the new size trained on (a step's loss is a function of its examples: a skipped or repeated one
    changes it), and the adapter at the end is that run's (1e-5). A resume that failed to load would stop
    with "no usable checkpoint"; one that ignored it would start from step 0."""
    runs = {(2, 2): equivalence_runs["zero2"][1], (3, 2): equivalence_runs["zero3"][1],
            (2, 1): equivalence_runs["one_worker"][1], (3, 1): one_worker_zero3}
    src_workers, new_workers = (2, 1) if direction == "2to1" else (1, 2)
    source, reference = runs[(zero, src_workers)], runs[(zero, new_workers)]
    d = equivalence_runs["_job"](tmp_path / "resumed", deepspeed__zero_stage=zero, scaling__num_workers=new_workers)
    ckpt = str(_checkpoint_at(source, 5))
    if new_workers == 1:
        record = run_here(d, resume_from=ckpt)
    else:
        plan = check_job(resolve_paths(spec_from_dict(d)))
        result, _, _ = fit_job(plan, resume_from=ckpt)
        assert result.error is None, result.error
        record = result.metrics
    tr = record.get("train", record)
    assert tr["resumed_from_step"] == 5 and tr["resumed_optimizer_steps"] == 5, tr
    mine, ref = losses(tmp_path / "resumed"), losses(reference)  # the first 5: the source run's, restored
    assert max(abs(a - b) for a, b in zip(mine[5:], ref[5:], strict=True)) < 1e-5, (mine, ref)
    w, r = adapter_weights(tmp_path / "resumed"), adapter_weights(reference)
    assert max((w[k] - r[k]).abs().max().item() for k in r) < 1e-5


def test_a_checkpoint_ray_train_never_registered_is_removed_when_the_run_ends(equivalence_runs, tmp_path):
    """A worker killed after writing its checkpoint but before Ray Train registered it leaves the folder behind
    (benchmarks/chaos.py saw one): Ray deletes only the ones it knows. Once the run is over, `train` removes it
    and keeps the registered ones (a copy of the real run's folder, with Ray Train's own snapshot)."""
    import shutil

    from ftray.train.launch import prune_unregistered

    run = tmp_path / "checkpoints"
    shutil.copytree(equivalence_runs["zero2"][1] / "checkpoints", run)
    registered = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(registered) == 2  # steps 5 and 10
    shutil.copytree(run / registered[0], run / "checkpoint_2026-01-01_00-00-00.000000")  # written, never reported
    assert prune_unregistered(str(run), log=lambda *a, **k: None) == ["checkpoint_2026-01-01_00-00-00.000000"]
    assert sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir()) == registered
    assert prune_unregistered(str(run), log=lambda *a, **k: None) == []


# ----------------------------------------------------------------------------- exact resume


def _cli_job(tmp: Path, name: str, tiny_model, arith, cache_dir, **over) -> Path:
    d = job_dict(tiny_model, arith[0], None, tmp / name, cache_dir, **over)
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _spawn(job: Path, log: Path, address: str = "local") -> subprocess.Popen:
    # RAY_ADDRESS=local: the job starts its own Ray, so its worker processes are its descendants. Given the
    # session's address, it joins that cluster as a job of its own (no Ray start-up); killing its driver ends
    # its trainer and workers.
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ftray", "train", str(job)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT,
    )


def _wait_for(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 400) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = log.read_text()
        if cond(text):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


STEPS, EVERY = 32, 4  # the first attempt is killed ~8 steps after its first checkpoint is stored
# 1 Ray Train worker: the rerun's resume is ftray's (the newest checkpoint in output.dir); 2 ranks' state
# resumed exactly: the resumes on another number of workers above, and the node lost in tests/test_cluster_e2e.py.
RESUME = dict(train__max_steps=STEPS, train__checkpoint_every=EVERY, adapter__dropout=0.1, scaling__num_workers=1)


def _past_checkpoint(after: int = 0):
    """A checkpoint after step `after` that Ray Train registered (the driver's "stored" line, printed once
    every rank's part is uploaded and the checkpoint manager's snapshot saved) in the log's newest attempt:
    files on disk are not enough, an upload in flight (`output.checkpoint_upload: async`) is not resumed from."""

    def cond(text: str) -> bool:
        last = text.rsplit("resumed from checkpoint at step", 1)[-1] if after else text
        stored = [int(m) for m in re.findall(r"\[ftray\] checkpoint at step (\d+) stored: ", last)]
        return any(s > after for s in stored)

    return cond


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, arith, cache_dir):
    tmp = tmp_path_factory.mktemp("resume")
    # The same 1-rank loop in this process (a 1-worker Ray Train run gives its curve to 1e-6:
    # tests/test_tune.py `test_best_yaml_reproduces_the_trial`), checkpoints stored before the next step; the
    # interrupted run below is a Ray Train job uploading them in the background (the default): the same weights
    # show that neither where it ran, the upload mode nor where it resumed changes a step.
    d = job_dict(tiny_model, arith[0], None, tmp / "straight", cache_dir, output__checkpoint_upload="sync", **RESUME)
    run_here(d)
    return adapter_weights(tmp / "straight")


def test_killed_driver_rerun_resumes_to_the_same_weights(tmp_path, tiny_model, arith, cache_dir, uninterrupted, ray_local):
    """A job on a Ray Train worker whose driver is SIGKILLed after a checkpoint: rerunning the same command resumes
    from the newest checkpoint in output.dir, and the adapter at the end equals the uninterrupted run's (1e-6):
    a resume that ignored the checkpoint, the optimizer state, the data position or the RNG (adapter dropout
    0.1 draws from it) would end elsewhere. Its checkpoints are uploaded in the background
    (`output.checkpoint_upload: async`): the kill waits for one that Ray Train registered, and resuming from it
    is exact all the same. (A worker lost within a job, which Ray Train restarts from its newest checkpoint:
    tests/test_cluster_e2e.py, a node of a real multi-node cluster killed mid-run.)"""
    job = _cli_job(tmp_path, "killed", tiny_model, arith, cache_dir, **RESUME)
    run, first_log, second_log = tmp_path / "killed", tmp_path / "first.log", tmp_path / "second.log"
    # The job joins the session's Ray (no Ray start-up of its own).
    address = ray_local.get_runtime_context().gcs_address
    first = _spawn(job, first_log, address)
    try:
        text = _wait_for(_past_checkpoint(), first, first_log, "a registered checkpoint")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    stored = int(re.findall(r"\[ftray\] checkpoint at step (\d+) stored: ", text)[0])
    assert not (run / "run.json").exists()
    last = max(map(int, re.findall(rf"\[ftray\] step (\d+)/{STEPS}", first_log.read_text())))
    print(f"first attempt: checkpoint at step {stored} stored, killed at step {last}")
    second = _spawn(job, second_log, address)
    assert second.wait(timeout=600) == 0, second_log.read_text()[-3000:]
    text = second_log.read_text()
    rerun = int(re.findall(rf"resumed from checkpoint at step (\d+)/{STEPS}", text)[0])
    assert stored <= rerun < STEPS and rerun % EVERY == 0, (stored, rerun)
    assert text.strip().splitlines()[-1] == f"run: {run}"
    record = json.loads((run / "run.json").read_text())
    assert record["train"]["resumed_from_step"] == rerun and record["train"]["steps"] == STEPS
    print(f"driver killed after the step-{stored} checkpoint was stored: the rerun resumed from step {rerun}")
    got = adapter_weights(run)
    diff = max((got[k] - uninterrupted[k]).abs().max().item() for k in got)
    assert diff <= 1e-6, diff
    # The drivers joined a cluster holding static S3 keys in their environment: the keys stayed out of every
    # actor's runtime_env (what `ray list actors --detail` and the dashboard show), the endpoint went in.
    assert_no_credentials_in_runtime_envs()
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY not passed to the cluster's workers" in text


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_sft_on_gpteacher_code_eval_loss_falls(tmp_path, tiny_model, cache_dir):
    """Full fine-tuning on real data, in one process: the evidence is the model's, not the sharding's."""

    train = needs_shared("sft", "gpteacher_code_train.jsonl")
    test = needs_shared("sft", "gpteacher_code_test.jsonl")
    d = job_dict(
        tiny_model, train, test, tmp_path / "code", cache_dir,
        data__format="instruction", data__max_length=256, data__eval_max_rows=64,
        train__max_steps=30, train__lr=2e-3, train__global_batch_size=8, train__micro_batch_size=4,
        adapter__kind="full", adapter__target_modules=None,
    )
    d["adapter"] = {"kind": "full"}
    record = run_here(d)
    before, after = record["eval"]["before"]["eval_loss"], record["eval"]["after"]["eval_loss"]
    print(f"gpteacher_code eval loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5


def test_continue_from_a_run_folder_unpacked(equivalence_runs, tmp_path, tiny_model, arith, cache_dir):
    """model.path = an earlier run: its adapter is trained further; run.json names the parent."""
    parent = equivalence_runs["zero2"][1]
    d = job_dict(parent, arith[0], arith[1], tmp_path / "child", cache_dir, train__max_steps=2, data__packing=False)
    d["adapter"] = {"kind": "lora"}  # the parent's adapter config is reused
    record = run_here(d)  # in process: what is checked is the run folder's lineage, not Ray
    assert record["parent_run"] == str(parent)
    assert record["base_model"] == str(tiny_model)
    assert record["data"]["train"]["padding_share"] == 0.0  # unpacked rows carry no padding in the shards
    # Training continued from the parent's weights, not from a fresh adapter.
    assert abs(record["eval"]["before"]["eval_loss"] - equivalence_runs["zero2"][0]["eval"]["after"]["eval_loss"]) < 1e-5


def test_export_merge_equals_adapter(equivalence_runs, tmp_path, tiny_model):
    """`ftray export RUN --merge`: a full model whose logits equal base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftray.cli import main

    run = equivalence_runs["zero2"][1]
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter").eval()
    ids = torch.tensor([[2, 23, 26, 17, 23, 29, 35]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "merged" / "tokenizer.json").exists()


def test_job_that_cannot_fit_is_refused_on_an_embedded_ray(ray_local, tiny_model, arith, cache_dir, tmp_path):
    """More CPUs than the cluster has: an embedded Ray can never grow, so the job is refused before any worker
    is placed (instead of waiting forever); a joined cluster gets a warning (an autoscaler may add nodes).
    A grpo job's reward replica counts too."""
    from ftray.config import SpecError
    from ftray.train.launch import check_fits

    have = ray_local.cluster_resources()["CPU"]
    big = spec_from_dict(job_dict(tiny_model, arith[0], None, tmp_path / "big", cache_dir, scaling__num_workers=4, scaling__cpus_per_worker=have / 2, train__micro_batch_size=2))
    with pytest.raises(SpecError, match=rf"scaling: the job needs {2 * have:g} CPUs .* the Ray cluster has {have:g}: lower"):
        check_fits(big, embedded=True)
    said: list[str] = []
    check_fits(big, embedded=False, log=lambda m, **_: said.append(m))
    assert len(said) == 1 and "waits until the cluster grows" in said[0]

    rm = {"path": str(tmp_path / "rm"), "num_cpus": have - 1.5}
    grpo = spec_from_dict(job_dict(tiny_model, arith[0], None, tmp_path / "g", cache_dir, method__kind="grpo", method__rewards={}, method__reward_model=rm))
    with pytest.raises(SpecError, match=r"\+ .* for the method's reward replica"):
        check_fits(grpo, embedded=True)
    check_fits(spec_from_dict(job_dict(tiny_model, arith[0], None, tmp_path / "ok", cache_dir)), embedded=True)
