"""The loop in one process without Ray (`ftray train --in-process`, `run_local`): the CLI path never
imports Ray, and the local session keeps, prunes and resumes from checkpoints as Ray Train would.
That it gives Ray Train's loss curve: tests/test_train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests._specs import ROOT, job_dict, shm_buffers_since

NO_RAY = """
import sys
from ftray.cli import main
rc = main(sys.argv[1:])
print("ray modules:", sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
sys.exit(rc)
"""


def test_in_process_cli_trains_without_importing_ray(tiny_model, arith, cache_dir, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(tiny_model, arith[0], arith[1], tmp_path / "run", cache_dir, train__max_steps=2)))
    t0 = time.time()
    # An empty torch extensions folder, as on a fresh machine: DeepSpeed's CPU backend would JIT-build its
    # shared-memory all-reduce op there (a C++ compile of 30-60 s), which training never calls.
    ext = tmp_path / "torch_extensions"
    r = subprocess.run([sys.executable, "-c", NO_RAY, "train", str(job), "--in-process"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert not list(ext.glob("**/*.so")) and "built successfully" not in r.stdout + r.stderr, r.stdout[-2000:]
    assert shm_buffers_since(t0) == []  # no DeepSpeed shared-memory buffer left in /dev/shm
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "ray modules: []" and lines[-2] == f"run: {tmp_path / 'run'}", lines[-5:]
    assert "1 worker instead of scaling.num_workers 2" in r.stdout
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["train"]["steps"] == 2
    assert [p["node_id"] for p in record["placement"]["ranks"]] == ["local"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def _checkpoint(folder: Path, step: int, whole: bool = True) -> str:
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes([step]))
    if whole:
        (folder / "state.json").write_text(json.dumps({"step": step, "history": []}))
    return str(folder)


def _steps(session) -> list[int]:
    """The steps of the checkpoints a resume would try, in order."""
    out = []
    for _, opened in session.checkpoints():
        with opened() as d:
            out.append(json.loads((Path(d) / "state.json").read_text())["step"])
    return out


def test_local_session_keeps_the_newest_and_resumes_from_it(tmp_path):
    from ftray.train.loop import LocalSession

    out = tmp_path / "run"
    s = LocalSession(str(out), keep=2)
    assert _steps(s) == []  # nothing yet, no resume_from
    for step in (4, 8, 12):
        s.report({"step": step}, _checkpoint(tmp_path / f"c{step}", step))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint_local_000008", "checkpoint_local_000012"], names
    assert _steps(LocalSession(str(out), keep=2)) == [12, 8]  # a rerun on the folder: the newest first
    # A folder without its state (a kill while it was being written) is not a checkpoint.
    _checkpoint(out / "checkpoints" / "checkpoint_local_000016", 16, whole=False)
    assert _steps(LocalSession(str(out), keep=2)) == [12, 8]
    # Another run's checkpoint is used only when this folder has none of its own.
    other = _checkpoint(tmp_path / "other", 3)
    assert _steps(LocalSession(str(tmp_path / "fresh"), keep=None, resume_from=other)) == [3]
    assert s.last_metrics == {"step": 12}


def test_unusable_latest_checkpoints_fall_back_to_the_one_before(tiny_model, arith, cache_dir, tmp_path, capfd):
    """An 8-step run checkpointed every 2 steps, then its newest checkpoint cut short (a file of it truncated)
    and the one before corrupted (a file of the right size overwritten): the rerun says which it could not
    use, resumes from step 4, and ends on the weights of the run that was not interrupted (1e-6)."""
    import torch
    from safetensors.torch import load_file

    from tests._specs import run_here

    run = tmp_path / "run"
    d = job_dict(tiny_model, arith[0], None, run, cache_dir, train__max_steps=8, train__checkpoint_every=2,
                 output__keep_checkpoints=3, adapter__dropout=0.1)
    first = run_here(d)
    straight = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"checkpoint_local_00000{s}" for s in (4, 6, 8)]

    def biggest(step: int) -> Path:
        return max((p for p in (ckpts / f"checkpoint_local_00000{step}").rglob("*.pt")), key=lambda p: p.stat().st_size)

    cut = biggest(8)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size // 2)
    bad = biggest(6)
    bad.write_bytes(torch.randint(0, 256, (bad.stat().st_size,), dtype=torch.uint8).numpy().tobytes())
    (run / "run.json").unlink()  # as after a kill: the run did not finish
    capfd.readouterr()
    record = run_here(d)
    out = capfd.readouterr().out
    assert f"checkpoint {ckpts / 'checkpoint_local_000008'} cannot be resumed from: {cut.relative_to(cut.parents[1])} has" in out, out[-3000:]
    assert f"checkpoint {ckpts / 'checkpoint_local_000006'} cannot be resumed from: " in out, out[-3000:]
    assert "resumed from checkpoint at step 4/8 (not from " in out
    assert record["train"]["resumed_from_step"] == 4 and record["train"]["steps"] == 8
    # The tokens of all 8 steps, the 4 before the resume included.
    assert record["train"]["trained_tokens"] == first["train"]["trained_tokens"] > 0, (first["train"], record["train"])
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert max((got[k] - straight[k]).abs().max().item() for k in got) <= 1e-6
