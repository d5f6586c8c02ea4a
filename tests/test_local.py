"""The loop in one process without Ray (`ftray train --in-process`, `run_local`): the CLI path never
imports Ray, and the local session keeps, prunes and resumes from checkpoints as Ray Train would.
That it gives Ray Train's loss curve: tests/test_train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests._specs import ROOT, job_dict

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
    r = subprocess.run([sys.executable, "-c", NO_RAY, "train", str(job), "--in-process"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
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


def test_local_session_keeps_the_newest_and_resumes_from_it(tmp_path):
    from ftray.train.loop import LocalSession

    out = tmp_path / "run"
    s = LocalSession(str(out), keep=2)
    with s.latest_checkpoint() as d:
        assert d is None  # nothing yet, no resume_from
    for step in (4, 8, 12):
        s.report({"step": step}, _checkpoint(tmp_path / f"c{step}", step))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint_local_000008", "checkpoint_local_000012"], names
    with LocalSession(str(out), keep=2).latest_checkpoint() as d:  # a rerun on the folder
        assert json.loads((Path(d) / "state.json").read_text())["step"] == 12
    # A folder without its state (a kill while it was being written) is not a checkpoint.
    _checkpoint(out / "checkpoints" / "checkpoint_local_000016", 16, whole=False)
    with LocalSession(str(out), keep=2).latest_checkpoint() as d:
        assert json.loads((Path(d) / "state.json").read_text())["step"] == 12
    # Another run's checkpoint is used only when this folder has none of its own.
    other = _checkpoint(tmp_path / "other", 3)
    with LocalSession(str(tmp_path / "fresh"), keep=None, resume_from=other).latest_checkpoint() as d:
        assert json.loads((Path(d) / "state.json").read_text())["step"] == 3
    assert s.last_metrics == {"step": 12}
