"""Watching a run while it trains: its TensorBoard events are in `<output.dir>/tb` at each log step, readable
by TensorBoard's own reader before the job ends (`ftray train --in-process`: the same loop, no Ray)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import yaml

from tests._specs import ROOT, job_dict


def test_tensorboard_events_are_readable_while_the_job_runs(tmp_path, tiny_model, arith, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    d = job_dict(tiny_model, arith[0], arith[1], out, cache_dir, train__max_steps=5000, train__log_every=1,
                 scaling__num_workers=1, method__exact_match=False)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(d))
    proc = subprocess.Popen([sys.executable, "-m", "ftray", "train", str(job), "--in-process"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen: list[int] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "tb").is_dir():
                ea = EventAccumulator(str(out / "tb"))
                ea.Reload()
                if "loss" in ea.Tags()["scalars"]:
                    seen = [e.step for e in ea.Scalars("loss")]
                    if len(seen) >= 3:
                        assert "eval/eval_loss" in ea.Tags()["scalars"]  # the evaluation before training
                        break
            time.sleep(0.5)
        running = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert running, f"the job ended (rc {proc.returncode}) before its events were read:\n{err.decode()[-3000:]}"
    assert len(seen) >= 3 and seen == sorted(seen) and seen[0] == 1, seen
    assert not (out / "run.json").exists()  # read while the job was still going
