"""Integration: real Ray Train workers running DeepSpeed (gloo, CPU) on a tiny Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ftray.config import resolve_paths, spec_from_dict
from tests._specs import ROOT, job_dict, needs_shared, run_here

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
    runs = {"_job": lambda out, **over: job_dict(tiny_model, arith[0], arith[1], out, cache_dir, train__max_steps=10, **over)}
    for name, over in {
        "zero2": {"deepspeed__zero_stage": 2},
        "zero3": {"deepspeed__zero_stage": 3},
        "one_worker": {"deepspeed__zero_stage": 2, "scaling__num_workers": 1},
    }.items():
        runs[name] = (run_job(runs["_job"](base / name, **over)), base / name)
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


def test_in_process_loop_equals_the_ray_train_loop(equivalence_runs, tmp_path):
    """The same 1-worker job through `run_local` (no Ray) and through a Ray Train worker: one loop, one
    loss curve (1e-6), one held-out loss at the end."""
    record, run = equivalence_runs["one_worker"]
    here = run_here(equivalence_runs["_job"](tmp_path / "here", deepspeed__zero_stage=2, scaling__num_workers=1))
    ray_losses, here_losses = losses(run), losses(tmp_path / "here")
    assert len(here_losses) == 10 and max(abs(a - b) for a, b in zip(ray_losses, here_losses, strict=True)) < 1e-6
    assert abs(here["eval"]["after"]["eval_loss"] - record["eval"]["after"]["eval_loss"]) < 1e-6
    assert here["placement"]["ranks"][0]["node_id"] == "local"


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


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    """Until the step-4 checkpoint is registered: files on disk are not enough (the controller
    registers a checkpoint after every rank reported it), so wait for progress two steps past it."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list((run / "checkpoints").glob("checkpoint_*")) and "[ftray] step 6/16" in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended before its first checkpoint (rc {proc.returncode})")
        time.sleep(0.5)
    raise AssertionError("no checkpoint in time")


RESUME = dict(train__max_steps=16, train__checkpoint_every=4, adapter__dropout=0.1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, arith, cache_dir, ray_local):
    tmp = tmp_path_factory.mktemp("resume")
    d = job_dict(tiny_model, arith[0], None, tmp / "straight", cache_dir, **RESUME)
    run_job(d)
    return adapter_weights(tmp / "straight")


def test_sigkilled_worker_resumes_to_same_weights(tmp_path, tiny_model, arith, cache_dir, uninterrupted):
    import psutil

    job = _cli_job(tmp_path, "killed", tiny_model, arith, cache_dir, **RESUME)
    log = tmp_path / "killed.log"
    proc = _spawn(job, log)
    try:
        _wait_for_checkpoint(tmp_path / "killed", proc, log)
        workers = [
            p for p in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())
        ]
        assert workers, "no Ray Train worker process found"
        workers[-1].send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "resumed from checkpoint at step" in text, text[-3000:]
    redone = [line for line in text.splitlines() if "resumed from checkpoint at step" in line][0]
    print(f"after SIGKILL: {redone.split('[ftray]')[-1].strip()}")
    got = adapter_weights(tmp_path / "killed")
    diff = max((got[k] - uninterrupted[k]).abs().max().item() for k in got)
    assert diff <= 1e-6, diff


def test_rerunning_the_same_command_resumes(tmp_path, tiny_model, arith, cache_dir, uninterrupted, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    job = _cli_job(tmp_path, "again", tiny_model, arith, cache_dir, **RESUME)
    first = _spawn(job, tmp_path / "first.log", address)
    try:
        _wait_for_checkpoint(tmp_path / "again", first, tmp_path / "first.log")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "again" / "run.json").exists()
    second = _spawn(job, tmp_path / "second.log", address)
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    text = (tmp_path / "second.log").read_text()
    assert "resumed from checkpoint at step" in text
    assert text.strip().splitlines()[-1] == f"run: {tmp_path / 'again'}"
    got = adapter_weights(tmp_path / "again")
    assert max((got[k] - uninterrupted[k]).abs().max().item() for k in got) <= 1e-6


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
