"""Chaos: a training job and a served app, each SIGKILLed again and again for minutes (issue 16 item 12).

One local Ray (4 logical CPUs on this machine's 2 cores) holds, for `--seconds`:
- a 2-worker `ftray train` job (LoRA SFT on the arithmetic task, tiny Llama, ZeRO-2, a checkpoint every
  `--checkpoint-every` steps, adapter dropout 0.1 so that a resume must restore the RNG as well): every
  `--train-every` s one of its Ray Train worker processes is SIGKILLed (rank 0 and the other rank in turn), and
  Ray Train restarts the worker group from the newest stored checkpoint;
- the app of benchmarks/serve_load.py (the same tiny model with 2 LoRA adapters, one generator replica) under
  steady load from `--concurrency` HTTP clients: every `--serve-every` s the generator replica's process is
  SIGKILLed, and Serve starts another.
A kill waits until the one before it of its kind was recovered from (the job stored a checkpoint after its
restart; the app answered again), so that the job moves forward however short the interval; no kill comes in
the window's last `--quiet` s, so the last recovery is seen.

Before that, the same job runs once without kills: the chaos job must end on its adapter (goal: max abs
difference <= 1e-6). Reported, and written whole to benchmarks/results/chaos.md: kills survived, that
difference, requests sent / answered / failed (failures split into those in flight at a kill, the only ones
allowed to fail, and the others), and the time to recover after each kill.

    python benchmarks/chaos.py                                     # about 7 min on 2 cores
    python benchmarks/chaos.py --seconds 900 --train-every 60 --serve-every 90 --steps 400   # longer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from statistics import median

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import BIN, ROOT, stamp  # noqa: E402
from serve_load import build_models, config, load, serve_app  # noqa: E402

sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "chaos.md"
STEP = re.compile(r"\(RayTrainWorker pid=(\d+)\).*\[ftray\] step (\d+)/\d+ loss")
STARTED = re.compile(r"\[ftray\] \w+ \+ \w+: [\d,]+ trainable of")  # rank 0 of a (re)started worker group
RESUMED = re.compile(r"\[ftray\] resumed from checkpoint at step (\d+)/")
STORED = re.compile(r"\[ftray\] checkpoint at step (\d+) stored")
WORKERS_UP = re.compile(r"Started training worker group of size")  # Ray Train: the group's processes are up
# The Serve controller's line for each generator replica that came up: seconds from its start, in its constructor.
REPLICA_UP = re.compile(
    r"deployment='gen-\w+', app='bench'\) started successfully .* after ([\d.]+)s .* took ([\d.]+)s"
)


class Job:
    """`ftray train JOB` joined to this process's Ray, as a user types it; its lines stamped as they arrive."""

    def __init__(self, job: Path, address: str, log: Path):
        # The poll interval of Ray Train's controller, as on an embedded Ray (ftray/train/launch.py `ensure_ray`).
        env = {
            **os.environ,
            "RAY_ADDRESS": address,
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        }
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "ftray"), "train", str(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self._log.open("w") as f:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line.rstrip()))
                f.write(f"{self.lines[-1][0] - self.t0:8.2f} {line}")
                f.flush()

    def after(self, t: float, pattern: re.Pattern) -> tuple[float, re.Match] | None:
        """The first line after time `t` that matches."""
        return next(
            ((at, m) for at, line in list(self.lines) if at > t and (m := pattern.search(line))), None
        )

    def last_before(self, t: float, pattern: re.Pattern) -> re.Match | None:
        return next(
            (m for at, line in reversed(list(self.lines)) if at <= t and (m := pattern.search(line))), None
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def alive(prefix: str) -> list[int]:
    """PIDs of this cluster's live actors whose class name starts with `prefix`."""
    from ray.util.state import list_actors

    return [
        a.pid
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
        if a.class_name.startswith(prefix)
    ]


def orphans(run: Path) -> dict:
    """The checkpoint folders in the run folder, and those Ray Train's checkpoint manager does not list."""
    folder = run / "checkpoints"
    snapshot = folder / "checkpoint_manager_snapshot.json"
    listed = (
        {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]}
        if snapshot.exists()
        else set()
    )
    on_disk = sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir())
    return {"on_disk": len(on_disk), "unregistered": [n for n in on_disk if n not in listed]}


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def job_yaml(work: Path, name: str, base: Path, train: Path, a: argparse.Namespace) -> Path:
    from tests._specs import job_dict

    d = job_dict(
        base,
        train,
        None,
        work / name,
        work / "cache",
        train__max_steps=a.steps,
        train__checkpoint_every=a.checkpoint_every,
        adapter__dropout=0.1,
        scaling__max_failures=-1,
    )
    p = work / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def chaos(a: argparse.Namespace, job: Job, url: str, t0: float) -> tuple[dict, list[dict], list[dict]]:
    """Load the app for `a.seconds` from `t0` while killing; returns (the load's results, train kills, serve kills)."""
    ok: list[tuple[float, float]] = []
    box: dict = {}
    loader = threading.Thread(
        target=lambda: box.update(
            res=asyncio.run(load(url, a.concurrency, a.seconds, ["a0", "a1"], a.max_tokens, ok_times=ok))
        )
    )
    loader.start()
    train_kills: list[dict] = []
    serve_kills: list[dict] = []
    next_train, next_serve = t0 + a.train_every, t0 + a.serve_every / 2  # staggered: not both at once
    last = t0 + a.seconds - a.quiet
    while loader.is_alive():
        now = time.monotonic()
        if next_train <= now < last and job.proc.poll() is None and train_ready(job, train_kills):
            step, workers = job.last_before(now, STEP), alive("RayTrainWorker")
            if step and len(workers) == 2:
                rank0 = int(step.group(1))
                pid = rank0 if len(train_kills) % 2 == 0 else next(p for p in workers if p != rank0)
                os.kill(pid, signal.SIGKILL)
                train_kills.append(
                    {"at": time.monotonic(), "rank": 0 if pid == rank0 else 1, "step": int(step.group(2))}
                )
                print(
                    f"[chaos] {now - t0:5.0f} s: SIGKILL train worker rank {train_kills[-1]['rank']} (pid {pid}) "
                    f"after step {step.group(2)}",
                    flush=True,
                )
                next_train = now + a.train_every
        # The next replica kill once the app answered a request sent after the last one.
        if next_serve <= now < last and (not serve_kills or any(s > serve_kills[-1]["at"] for s, _ in ok)):
            replicas = alive("ServeReplica:bench:gen-")
            if len(replicas) == 1:
                os.kill(replicas[0], signal.SIGKILL)
                serve_kills.append({"at": time.monotonic()})
                print(f"[chaos] {now - t0:5.0f} s: SIGKILL generator replica (pid {replicas[0]})", flush=True)
                next_serve = now + a.serve_every
        time.sleep(0.25)
    loader.join()
    return box["res"], train_kills, serve_kills


def train_ready(job: Job, kills: list[dict]) -> bool:
    """The job trains (before the first kill), or it stored a checkpoint after restarting from the last kill."""
    if not kills:
        return job.after(0, STEP) is not None
    started = job.after(kills[-1]["at"], STARTED)
    return started is not None and job.after(started[0], STORED) is not None


def train_recovery(job: Job, kills: list[dict]) -> None:
    """Per kill: when Ray Train's new worker processes were up, when the new group's rank 0 had built its engine,
    the step it resumed from, when it trained again."""
    for i, k in enumerate(kills):
        until = kills[i + 1]["at"] if i + 1 < len(kills) else float("inf")
        started = job.after(k["at"], STARTED)
        if started is None or started[0] > until:
            continue
        workers, resumed, first = (
            job.after(k["at"], WORKERS_UP),
            job.after(k["at"], RESUMED),
            job.after(started[0], STEP),
        )
        k.update(
            workers_up_s=workers[0] - k["at"] if workers else None,
            group_up_s=started[0] - k["at"],
            resumed_from=int(resumed[1].group(1)) if resumed and resumed[0] < until else 0,
            trains_again_s=first[0] - k["at"] if first and first[0] < until else None,
        )


def serve_recovery(res: dict, kills: list[dict], controller_log: str) -> None:
    """Per kill: the requests in flight at it (sent before, ended after) and how many of them failed; the first answer
    to a request sent after it (an upper bound on the outage a client sees: a request queued before the kill may
    have been answered sooner); the replacement replica's start and constructor seconds (the Serve controller's log)."""
    ups = [m.groups() for m in REPLICA_UP.finditer(controller_log)]
    ups = ups[1:]  # the first one came up with the app, before any kill
    for i, k in enumerate(kills):
        k["in_flight"] = sum(1 for s, e in res["_ok"] if s <= k["at"] <= e)
        k["failed_in_flight"] = sum(1 for s, e, _ in res["_failed"] if s <= k["at"] <= e)
        k["in_flight"] += k["failed_in_flight"]
        k["recover_s"] = min((d for s, d in res["_ok"] if s > k["at"]), default=float("nan")) - k["at"]
        k["replica_s"], k["constructor_s"] = (
            map(float, ups[i]) if i < len(ups) else (float("nan"), float("nan"))
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=270.0, help="the chaos window: load and kills")
    ap.add_argument("--train-every", type=float, default=40.0, help="N: seconds between train worker kills")
    ap.add_argument(
        "--serve-every", type=float, default=60.0, help="M: seconds between generator replica kills"
    )
    ap.add_argument("--quiet", type=float, default=30.0, help="no kill in the window's last seconds")
    ap.add_argument("--steps", type=int, default=200, help="the training job's steps")
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--size", default="nano", help="tiny model size (trained and served)")
    a = ap.parse_args()
    t_all, load0 = time.time(), os.getloadavg()

    import ray
    from ray import serve

    from ftray.data.synthetic import write_arithmetic
    from tests._specs import free_port

    work = Path(tempfile.mkdtemp(prefix="ftray-chaos-"))
    base, reg = build_models(work, 2, a.size)
    train_file, _ = write_arithmetic(work / "arith")
    ray.init(num_cpus=4, include_dashboard=True, configure_logging=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address

    print("[chaos] the job without kills", flush=True)
    ref = Job(job_yaml(work, "straight", base, train_file, a), address, work / "straight.log")
    if ref.wait(timeout=1200) != 0:
        print((work / "straight.log").read_text()[-3000:])
        return 1
    ref_s = time.monotonic() - ref.t0

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = serve_app(config(base, reg, 16), port, ["a0", "a1"])
    print(f"[chaos] {a.seconds:g} s of load and kills", flush=True)
    job = Job(job_yaml(work, "chaos", base, train_file, a), address, work / "chaos.log")
    res, train_kills, serve_kills = chaos(a, job, url, job.t0)
    print("[chaos] window over; the job trains on to its end", flush=True)
    rc = job.wait(timeout=1800)
    job_s = time.monotonic() - job.t0
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    serve.shutdown()
    controller_log = "".join(p.read_text() for p in sorted(logs.glob("controller_*.log")))
    ray.shutdown()

    train_recovery(job, train_kills)
    serve_recovery(res, serve_kills, controller_log)
    (work / "chaos.json").write_text(
        json.dumps(
            {
                "train_kills": train_kills,
                "serve_kills": serve_kills,
                "t0": job.t0,
                "answered": res["_ok"],
                "failed": res["_failed"],
            }
        )
    )
    runs = {
        name: json.loads(p.read_text()) if (p := work / name / "run.json").exists() else {}
        for name in ("chaos", "straight")
    }
    diff = None
    if rc == 0:
        got, want = adapter(work / "chaos"), adapter(work / "straight")
        diff = (
            max((got[k] - want[k]).abs().max().item() for k in want)
            if got.keys() == want.keys()
            else float("inf")
        )
    ckpts = {
        "refused": sum(1 for _, line in job.lines if "cannot be resumed from" in line),
        **orphans(work / "chaos"),
    }
    timing = {"t0": job.t0, "job_s": job_s, "ref_s": ref_s}
    lines = report(a, stamp(t_all, load0), res, train_kills, serve_kills, rc, diff, runs, ckpts, timing)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {RESULTS}; logs and raw times in {work}")
    return 0


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _s(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"


def report(
    a: argparse.Namespace,
    stamped: str,
    res: dict,
    train_kills: list[dict],
    serve_kills: list[dict],
    rc: int,
    diff: float | None,
    runs: dict,
    ckpts: dict,
    timing: dict,
) -> list[str]:
    """The results file's lines; times in seconds from the start of the window (the chaos job's launch)."""
    t0, chaos, straight = timing["t0"], runs["chaos"], runs["straight"]
    completed = rc == 0 and chaos.get("status") == "completed"
    survived = [k for k in train_kills if k.get("trains_again_s") is not None]
    failed = res["_failed"]
    others = [f for f in failed if not any(f[0] <= k["at"] <= f[1] for k in serve_kills)]
    rec = sorted(k["recover_s"] for k in serve_kills if not math.isnan(k["recover_s"]))
    again = sorted(k["trains_again_s"] for k in survived)
    lines = [
        "# Chaos: SIGKILLs under training and serving",
        "",
        stamped,
        "",
        f"One local Ray (4 logical CPUs on 2 cores). For {a.seconds:g} s: a 2-worker `ftray train` job (tiny Llama "
        f"`{a.size}`, LoRA r 4 on q/v with dropout 0.1, SFT on arithmetic, ZeRO-2, {a.steps} steps, a checkpoint every "
        f"{a.checkpoint_every} uploaded in the background, `scaling.max_failures: -1`) whose Ray Train worker processes "
        f"were SIGKILLed every {a.train_every:g} s (rank 0 and rank 1 in turn), beside the app of `benchmarks/serve_load.py` "
        f"(the same model, 2 LoRA adapters, one generator replica) under load from {a.concurrency} HTTP clients "
        f"({a.max_tokens} new tokens, greedy) whose generator replica process was SIGKILLed every {a.serve_every:g} s. A "
        f"kill waits for the recovery from the one before it (the job stored a checkpoint after its restart; the app "
        f"answered a request sent after the kill); none in the window's last {a.quiet:g} s. The same job ran once before, "
        f"alone and without kills ({timing['ref_s']:.0f} s). Times are seconds from the start of the window.",
        "",
        "## Training",
        "",
        f"- Kills survived: {len(survived)} of {len(train_kills)}; the job "
        + (
            f"completed its {chaos['train']['steps']} steps {timing['job_s']:.0f} s after its launch"
            if completed
            else f"did not complete (exit code {rc})"
        )
        + f"; checkpoints refused at a resume (unusable): {ckpts['refused']}; checkpoint folders left in the run "
        f"folder: {ckpts['on_disk']} (`output.keep_checkpoints` 2), of which not registered by Ray Train (written by an "
        f"attempt killed before its report reached the controller, never deleted): {len(ckpts['unregistered'])}.",
        "- Final adapter against the uninterrupted run's: "
        + (
            f"max abs difference {diff:.3g} (goal <= 1e-6: {_met(diff <= 1e-6)}); final loss "
            f"{chaos['train']['final_loss']:.6f} vs {straight['train']['final_loss']:.6f}."
            if diff is not None
            else "none to compare (the job did not finish): **missed**."
        ),
        "- Time to recover, the kill to the restarted group's first step: "
        + (f"median {median(again):.1f} s, max {again[-1]:.1f} s." if again else "no kill survived."),
        "",
        "| kill | at s | rank killed | last step logged | resumed from step | steps redone | worker processes up "
        "after s | engine built after s | trains again after s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, k in enumerate(train_kills, 1):
        head = f"| {i} | {k['at'] - t0:.0f} | {k['rank']} | {k['step']} |"
        if "group_up_s" not in k:
            lines.append(f"{head} - | - | - | not restarted | - |")
            continue
        lines.append(
            f"{head} {k['resumed_from']} | {k['step'] - k['resumed_from']} | {_s(k['workers_up_s'])} | "
            f"{_s(k['group_up_s'])} | {_s(k['trains_again_s'])} |"
        )
    lines += [
        "",
        "## Serving",
        "",
        f"- Kills survived: {len(rec)} of {len(serve_kills)} (the app answered a request sent after the kill).",
        f"- Requests sent {res['requests'] + res['failed']}, answered {res['requests']}, failed {res['failed']}: "
        f"{res['failed'] - len(others)} in flight at a kill, {len(others)} others (goal 0: {_met(not others)})"
        + (
            f"; failed as: {', '.join(f'{w} x{n}' for w, n in Counter(f[2] for f in failed).items())}."
            if failed
            else "."
        ),
        "- Time to recover, the kill to the first answer to a request sent after it: "
        + (f"median {median(rec):.1f} s, max {rec[-1]:.1f} s." if rec else "no kill survived."),
        "",
        "| kill | at s | requests in flight | of which failed | first answer after s | replacement replica: "
        "start to ready s (Serve controller) | of which its constructor s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {i} | {k['at'] - t0:.0f} | {k['in_flight']} | {k['failed_in_flight']} | {_s(k['recover_s'])} | "
        f"{_s(k['replica_s'])} | {_s(k['constructor_s'])} |"
        for i, k in enumerate(serve_kills, 1)
    ]
    if others:
        lines += ["", "Failures not in flight at a kill (sent at s, failed at s, answer):", ""]
        lines += [f"- {s - t0:.1f}, {e - t0:.1f}, {w}" for s, e, w in others[:20]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
