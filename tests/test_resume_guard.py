"""A run folder belongs to one spec and one run at a time (issue 16, items 2 and 4): the checkpoints record the
spec's training fields and a resume that changes one is refused naming it; a folder another run holds (its
lease) is refused, a dead owner's lease is not; CUDA's RNG state is in the checkpoint; what is published is
on disk before its name. No Ray, no training: the real checkpoints are the session's `method_runs`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ftray.config import SpecError, resolve_paths, spec_from_dict, training_fields
from tests._specs import ROOT, job_dict, method_spec


def _spec(**over):
    return spec_from_dict(job_dict(Path("/m"), Path("/t"), Path("/e"), Path("/o"), Path("/c"), **over))


# ----------------------------------------------------------------------------- which fields count


def test_training_fields_leave_out_what_a_resume_may_change():
    f = training_fields(_spec())
    for k in ("model.path", "data.train", "data.max_length", "method.kind", "adapter.r", "adapter.target_modules",
              "train.seed", "train.global_batch_size", "train.lr", "deepspeed.zero_stage", "scaling.use_gpu"):
        assert k in f, k
    assert not [k for k in f if k.startswith(("output.", "storage.", "train.max_steps", "train.checkpoint_every",
                                                  "train.eval_every", "train.log_every", "data.eval", "name"))], f
    # Extending the run, checkpointing and logging differently, writing elsewhere: the same training fields.
    # Resuming on another number of workers (the checkpoint is resharded: tests/test_train.py).
    assert f == training_fields(_spec(train__max_steps=60, train__checkpoint_every=5, train__log_every=7,
                                      output__dir="/elsewhere", output__keep_checkpoints=9, scaling__num_workers=1))
    # max_new_tokens sizes sft's held-out generation only, but grpo's rollouts.
    assert "method.max_new_tokens" not in f
    grpo = spec_from_dict(method_spec("grpo", "/m", "/t", "/e", "/o"))
    assert training_fields(grpo)["method.max_new_tokens"] == 4 and "method.group_size" in training_fields(grpo)


def test_resume_changes_takes_only_the_allowable_fields():
    assert _spec(output__resume_changes=["train.lr", "data.train"]).output.resume_changes == ["train.lr", "data.train"]
    with pytest.raises(SpecError, match=r"output.resume_changes.*`adapter.r` is not a field a resumed run may change"):
        _spec(output__resume_changes=["adapter.r"])


# ----------------------------------------------------------------------------- a real run's checkpoints


@pytest.fixture
def trained(method_runs, tmp_path):
    """A copy of a session run's checkpoints (their state.json files: what the guard reads) and its spec, with
    `output.dir` the copy (the farm's folder is shared: nothing here may write into it)."""
    src = Path(method_runs["classify-full"])
    out = tmp_path / "run"
    shutil.copytree(src / "checkpoints", out / "checkpoints",
                    ignore=lambda d, names: [n for n in names if not n.startswith("checkpoint_") and n != "state.json"])
    rec = json.loads((src / "run.json").read_text())
    d = {**rec["spec"], "output": {**rec["spec"]["output"], "dir": str(out)}}
    return d, out


def _with(d: dict, **over) -> dict:
    d = json.loads(json.dumps(d))
    for k, v in over.items():  # `section__key`: one field; `section`: the whole section
        sec, _, key = k.partition("__")
        if key:
            d[sec][key] = v
        else:
            d[sec] = v
    return d


def test_same_spec_resumes_another_is_refused_naming_the_fields(trained):
    from ftray.train.launch import check_resume

    d, out = trained
    states = [json.loads(p.read_text()) for p in out.glob("checkpoints/*/state.json")]
    assert states and all(s["spec"] for s in states)  # the loop recorded its spec
    check_resume(spec_from_dict(d))
    check_resume(spec_from_dict(_with(d, train__max_steps=50, train__checkpoint_every=10)))  # extended: fine
    with pytest.raises(SpecError) as e:
        check_resume(spec_from_dict(_with(d, train__seed=7, adapter={"kind": "lora", "r": 4})))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"output.dir: {out} holds checkpoints of another spec"), msg
    assert "`adapter.kind` \"full\" -> \"lora\"" in msg and "`adapter.r` 8 -> 4" in msg and "`train.seed` 0 -> 7" in msg
    assert "resume_changes" not in msg  # none of these may ever change
    lr = spec_from_dict(_with(d, train__lr=d["train"]["lr"] * 2))
    with pytest.raises(SpecError, match=r"`train.lr` .* list train.lr in `output.resume_changes`$"):
        check_resume(lr)
    check_resume(spec_from_dict(_with(d, train__lr=d["train"]["lr"] * 2,
                                      output={**d["output"], "resume_changes": ["train.lr"]})))
    check_resume(lr, allow=("train.lr",))  # a PBT trial's searched keys


def test_changed_spec_is_refused_before_ray_and_leaves_the_folder_alone(trained, ray_down):
    from ftray.train.launch import train

    d, out = trained
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    t0 = time.time()
    with pytest.raises(SpecError, match=r"`train.seed` 0 -> 1"):
        train(resolve_paths(spec_from_dict(_with(d, train__seed=1))))
    assert not ray_down.is_initialized() and time.time() - t0 < 30
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ----------------------------------------------------------------------------- one run per folder


def test_a_held_folder_is_refused_and_free_again_once_released(tmp_path):
    from ftray.train.lease import LEASE, Lease

    out = tmp_path / "run"
    with Lease(str(out)):
        rec = json.loads((out / LEASE).read_text())
        assert rec["pid"] == os.getpid() and rec["heartbeat"] <= time.time()
        with pytest.raises(SpecError) as e:
            Lease(str(out)).acquire()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"output.dir: {out} is in use by another run (pid {os.getpid()}")
        assert str(out / LEASE) in msg  # the override: delete it
    assert not out.exists()  # the lease made the folder and left nothing in it
    (out / "checkpoints").mkdir(parents=True)
    with Lease(str(out)):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


HOLD = """
import sys, time
from ftray.train.lease import Lease
Lease(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_runs_lease_does_not_block_its_rerun(tmp_path):
    """The kill-and-rerun path of tests/test_train.py: the killed driver cannot release its lease; its process
    is gone, so the rerun on the same host takes the folder at once."""
    from ftray.train.lease import Lease

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(SpecError, match=rf"in use by another run \(pid {p.pid} "):
            Lease(str(out)).acquire()
    finally:
        p.kill()
        p.wait()
    said = []
    with Lease(str(out), log=lambda m, **_: said.append(m)):
        pass
    assert len(said) == 1 and f"taking over the lease of pid {p.pid}" in said[0] and "is gone" in said[0], said


def test_another_hosts_lease_holds_until_its_heartbeat_expires(tmp_path):
    from ftray.train.lease import LEASE, Lease

    out = tmp_path / "run"
    out.mkdir()
    rec = {"token": "x", "host": "elsewhere", "pid": 1, "pid_start": 0, "command": "ftray train a.yaml", "ttl_s": 120}
    (out / LEASE).write_text(json.dumps({**rec, "heartbeat": time.time() - 60}))
    with pytest.raises(SpecError, match=r"pid 1 on elsewhere, `ftray train a.yaml`, heartbeat 60 s ago"):
        Lease(str(out)).acquire()
    (out / LEASE).write_text(json.dumps({**rec, "heartbeat": time.time() - 121}))
    with Lease(str(out)) as mine:
        assert json.loads((out / LEASE).read_text())["token"] == mine.token


def test_the_heartbeat_keeps_the_lease_fresh_and_notices_a_takeover(tmp_path):
    from ftray.train.lease import LEASE, Lease

    out = tmp_path / "run"
    with Lease(str(out), ttl_s=0.2):  # a beat every 0.05 s
        first = json.loads((out / LEASE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((out / LEASE).read_text())["heartbeat"] > first
    said = []
    lease = Lease(str(out), log=lambda m, **_: said.append(m)).acquire()  # no beat within this test
    try:
        (out / LEASE).write_text(json.dumps({"token": "other", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
        lease.heartbeat()
        assert lease.lost and len(said) == 1 and "taken over by another run" in said[0], said
    finally:
        lease.release()
    assert json.loads((out / LEASE).read_text())["token"] == "other"  # not ours to remove


def test_lease_on_s3(s3, monkeypatch):
    from ftray import storage
    from ftray.train import lease as lease_mod
    from tests._s3 import BUCKET

    monkeypatch.setattr(lease_mod, "S3_SETTLE_S", 0.05)
    out = f"s3://{BUCKET}/lease-{uuid.uuid4().hex[:8]}/run"
    # A lost owner's lease on another host (each S3 call costs ~0.5 s against moto here: few of them).
    stale = {"token": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 500, "ttl_s": 120}
    storage.write_text_atomic(f"{out}/{lease_mod.LEASE}", json.dumps(stale))
    said = []
    with lease_mod.Lease(out, log=lambda m, **_: said.append(m)):  # written, read back: its token
        assert len(said) == 1 and "no heartbeat for 50" in said[0], said
        with pytest.raises(SpecError, match=rf"output.dir: {out} is in use by another run \(pid {os.getpid()} "):
            lease_mod.Lease(out).acquire()
    assert not storage.exists(f"{out}/{lease_mod.LEASE}")


def test_a_held_folder_refuses_a_job_before_ray(tmp_path, tiny_model, arith, cache_dir, ray_down):
    from ftray.train.launch import train
    from ftray.train.lease import Lease

    out = tmp_path / "run"
    spec = resolve_paths(spec_from_dict(job_dict(tiny_model, arith[0], None, out, cache_dir)))
    with Lease(str(out)), pytest.raises(SpecError, match=rf"output.dir: {out} is in use by another run"):
        train(spec)
    assert not ray_down.is_initialized()


# ----------------------------------------------------------------------------- RNG and durable writes


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """The checkpoint's RNG functions, with CUDA's generator faked on this CPU machine: its state is saved
    (through JSON, as rng_rank<r>.json holds it) and set again; the CPU generators come back too."""
    import random

    import numpy as np
    import torch

    from ftray.train.checkpoint import rng_state, set_rng_state

    cuda = {"state": torch.arange(16, dtype=torch.uint8), "set": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, device="cuda": cuda["set"].append(t.clone()))
    saved = json.loads(json.dumps(rng_state()))
    assert saved["cuda"] == list(range(16))
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(saved)
    assert [t.tolist() for t in cuda["set"]] == [list(range(16))]
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
    # A checkpoint from a CPU rank (or from before CUDA's state was kept) leaves CUDA's generator alone.
    set_rng_state({k: v for k, v in saved.items() if k != "cuda"})
    assert len(cuda["set"]) == 1
    # A rank that never initialised CUDA neither reads its generator nor creates a context to.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in rng_state()


def _durability_log(monkeypatch) -> list[tuple[str, str]]:
    """(event, path) for every fsync and rename, in order."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def on_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def on_replace(a, b):
        events.append(("replace", f"{a} -> {b}"))
        replace(a, b)

    monkeypatch.setattr(os, "fsync", on_fsync)
    monkeypatch.setattr(os, "replace", on_replace)
    return events


def test_run_json_and_metrics_are_on_disk_before_their_rename(tmp_path, monkeypatch):
    from ftray import storage
    from ftray.runs import RunFolder

    events = _durability_log(monkeypatch)
    RunFolder(str(tmp_path)).write_record({"status": "completed"})
    storage.write_text_atomic(str(tmp_path / "metrics.jsonl"), '{"step": 1}\n')
    for name in ("run.json", "metrics.jsonl"):
        i = next(i for i, (e, p) in enumerate(events) if e == "replace" and p.endswith(f"/{name}"))
        tmp = events[i][1].split(" -> ")[0]
        assert ("fsync", tmp) in events[:i], (name, events)
        assert ("fsync", str(tmp_path)) in events[i + 1:], (name, events)  # the rename itself
    assert json.loads((tmp_path / "run.json").read_text()) == {"status": "completed"}


def test_published_folders_and_files_are_on_disk_before_their_rename(tmp_path, monkeypatch):
    from ftray import storage

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    (tmp_path / "curves.png").write_bytes(b"png")
    events = _durability_log(monkeypatch)
    storage.publish_dir(src, str(tmp_path / "out" / "adapter"))
    storage.put_file_atomic(tmp_path / "curves.png", str(tmp_path / "out" / "curves.png"))
    i = next(i for i, (e, p) in enumerate(events) if e == "replace" and p.endswith("/adapter"))
    tmp = events[i][1].split(" -> ")[0]
    synced = {p for e, p in events[:i] if e == "fsync"}
    assert {f"{tmp}/a.bin", f"{tmp}/sub/b.bin", f"{tmp}/.complete", tmp} <= synced, events
    j = next(i for i, (e, p) in enumerate(events) if e == "replace" and p.endswith("/curves.png"))
    assert ("fsync", events[j][1].split(" -> ")[0]) in events[i:j], events
    assert (tmp_path / "out" / "adapter" / "sub" / "b.bin").read_bytes() == b"b"
    assert (tmp_path / "out" / "curves.png").read_bytes() == b"png"
