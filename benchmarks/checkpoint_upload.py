"""Checkpoint upload off the step path: the same job with `output.checkpoint_upload: sync`, `async`, and
no checkpoints at all (the floor), its run folder on S3 (a real `moto_server` on loopback).

    python benchmarks/checkpoint_upload.py [--steps 30] [--every 10]

Every arm trains the same tiny Llama (`build_tiny(size="small")`, 9.8M parameters, random init, tokenizer
trained on the data file) with full fine-tuning (so a checkpoint holds the module, the fp32 Adam moments and
the master weights: DeepSpeed's whole engine state), fp32, ZeRO-2, on 2 Ray Train workers x 1 CPU, on the
same SFT rows (../shared/data/sft/gpteacher_code_train.jsonl), max length 128, 8 sequences per optimizer
step, the same steps, seed and order. `ftray train` runs each arm as a user types it (its own embedded Ray).

Figures, from each run's run.json: `train_seconds` (first step to last; the intermediate checkpoints'
stalls are in it, the final one is not), `checkpoint_seconds` (what saving and storing the intermediate
checkpoints cost rank 0's step path) and the fit's wall time (Ray Train's whole fit, the final, always
synchronous, checkpoint included). The table goes to stdout and to benchmarks/results/checkpoint_upload.md.
Loopback S3 uploads at memory speed; a real bucket across a network makes each upload, and so what the
asynchronous mode takes off the step path, larger.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sft" / "gpteacher_code_train.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "checkpoint_upload.md"
ARMS = ("none", "sync", "async")
BIN = Path(sys.executable).parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def job(model: Path, work: Path, arm: str, steps: int, every: int) -> dict:
    return {
        "name": f"ckpt-{arm}",
        "model": {"path": str(model)},
        "data": {"train": str(DATA), "eval": None, "format": "instruction", "max_length": 128,
                 "cache_dir": str(work / "cache")},
        "method": {"kind": "sft"},
        "adapter": {"kind": "full"},
        "train": {"lr": 3e-4, "max_steps": steps, "global_batch_size": 8, "micro_batch_size": 4, "seed": 0,
                  "warmup_steps": 0, "lr_schedule": "constant", "log_every": 5,
                  "checkpoint_every": None if arm == "none" else every},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        "output": {"dir": f"s3://bench/ckpt-{arm}", "keep_checkpoints": 2,
                   "checkpoint_upload": "async" if arm == "none" else arm},
    }


def start_moto(port: int, logfile: Path) -> subprocess.Popen:
    exe = BIN / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=logfile.open("w"),
                            stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1).close()
            return proc
        except urllib.error.HTTPError:
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"moto_server did not answer on port {port}: {logfile.read_text()[-2000:]}")


def checkpoint_bytes(fs, arm: str) -> int:
    """The size of one stored checkpoint (the newest) of the arm's run."""
    found = sorted(p for p in fs.ls(f"bench/ckpt-{arm}/checkpoints") if "/checkpoint_2" in p)
    return sum(fs.du(found[-1], total=False).values()) if found else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per arm")
    ap.add_argument("--every", type=int, default=10, help="train.checkpoint_every of the checkpointing arms")
    a = ap.parse_args(argv)
    if not DATA.exists():
        print(f"checkpoint_upload: the benchmark data is absent: {DATA}", file=sys.stderr)
        return 2
    import boto3
    import s3fs

    from benchmarks._cli import count_params, ftray, stamp
    from ftray.models.tiny import build_tiny
    from tests._specs import free_port

    work = Path(tempfile.mkdtemp(prefix="ftray-bench-ckpt-"))
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)  # `ftray train` and its Ray workers inherit them
    moto = start_moto(port, work / "moto.log")
    t_all, load0 = time.time(), os.getloadavg()
    rows: dict[str, dict] = {}
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        model = build_tiny(work / "model", size="small", corpus=[str(DATA)])
        n_params = count_params(model)
        for arm in ARMS:
            path = work / f"{arm}.json"
            path.write_text(json.dumps(job(model, work, arm, a.steps, a.every)))
            wall = ftray("train", str(path))
            rec = json.loads(fs.cat(f"bench/ckpt-{arm}/run.json"))
            t = rec["train"]
            rows[arm] = {"train_s": t["train_seconds"], "ckpt_s": t["checkpoint_seconds"], "fit_s": rec["timings"]["fit_s"],
                         "wall_s": wall, "loss": t["final_loss"], "bytes": checkpoint_bytes(fs, arm)}
            log(f"{arm}: {json.dumps(rows[arm])}")
    finally:
        moto.kill()
        shutil.rmtree(work, ignore_errors=True)

    n_ckpt = (a.steps - 1) // a.every  # the intermediate ones; the final one is stored synchronously in every arm
    s, y, z = rows["sync"], rows["async"], rows["none"]
    saved = s["train_s"] - y["train_s"]
    lines = [
        "# Checkpoint upload off the step path (`output.checkpoint_upload`)",
        "",
        f"Written by {stamp(t_all, load0)}.",
        "",
        f"Tiny Llama `small` ({n_params / 1e6:.1f}M parameters), full fine-tuning, fp32, ZeRO-2, 2 Ray Train workers x 1 CPU, "
        f"{a.steps} steps of 8 sequences (max length 128); run folder on S3 (`moto_server` on loopback). "
        f"Checkpointing arms: every {a.every} steps = {n_ckpt} checkpoints during training + the final one; "
        f"one stored checkpoint is {s['bytes'] / 2**20:.0f} MiB (both ranks' shards). Seconds from each run's run.json.",
        "",
        "| arm | train seconds | checkpoint seconds on the step path | per checkpoint | fit wall (final checkpoint incl.) | final loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        r = rows[arm]
        per = f"{r['ckpt_s'] / n_ckpt:.2f}" if arm != "none" and n_ckpt else "-"
        lines.append(f"| {arm} | {r['train_s']:.1f} | {r['ckpt_s']:.2f} | {per} | {r['fit_s']:.1f} | {r['loss']:.4f} |")
    lines += [
        "",
        f"- Step-path cost of checkpointing, async / sync: {y['ckpt_s']:.2f} / {s['ckpt_s']:.2f} s = "
        f"{y['ckpt_s'] / max(s['ckpt_s'], 1e-9):.2f}; training time saved by async: {saved:.1f} s of {s['train_s']:.1f} "
        f"({100 * saved / s['train_s']:.1f} %).",
        f"- Over the floor (no checkpoints, {z['train_s']:.1f} s): sync +{s['train_s'] - z['train_s']:.1f} s, "
        f"async +{y['train_s'] - z['train_s']:.1f} s.",
        f"- Same work in every arm: final losses {s['loss']:.6f} (sync), {y['loss']:.6f} (async), {z['loss']:.6f} (none).",
        "- What async leaves on the step path: DeepSpeed writing the engine state to a local temporary folder on each "
        "rank (the upload to S3 runs in Ray Train's upload thread).",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
