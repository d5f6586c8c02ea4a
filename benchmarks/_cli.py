"""What the benchmarks that drive `ftray` as a user types it share: run one command, read a run folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ftray(*args: str, lock: str | None = None) -> float:
    """Run `ftray ARGS` from the repository root (echoed first); raise if it fails; return its wall seconds.
    `lock`: run it under `flock LOCK` (a machine shared by several users of Ray takes turns)."""
    t0 = time.time()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    cmd = (["flock", lock] if lock else []) + [str(BIN / "ftray"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.time() - t0


def record(run: Path) -> dict:
    """A finished run's run.json."""
    return json.loads((run / "run.json").read_text())


def done(run: Path) -> bool:
    """The run folder holds a completed run (so a rerun of the benchmark can skip it)."""
    return (run / "run.json").exists() and record(run).get("status") == "completed"


@contextlib.contextmanager
def held(lock: str | None):
    """`flock LOCK` held for the block (none without a lock): one CPU-heavy user at a time on a shared machine."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_kept(spec, log: Path, lock: str | None) -> dict:
    """`run_local(spec)` (in process, one worker) under `lock`, its log to `log`; its run.json. A completed run
    already in `spec.output.dir` with this very spec (an earlier invocation measured it) is kept, not retrained."""
    from ftray.train.local import run_local

    out = Path(spec.output.dir)
    if done(out) and record(out)["spec"] == spec.model_dump(mode="json"):
        return record(out)
    shutil.rmtree(out, ignore_errors=True)
    with held(lock), open(log, "w") as logf:
        return run_local(spec, log=lambda *a, **k: print(*a, file=logf, flush=True))


def write_split(items: list[str], n_val: int, seed: int, fit: Path, val: Path) -> None:
    """`n_val` of `items` (a seeded draw) written to `val`, the rest to `fit`, each in the original order: a
    validation split carved out of a training file (hyperparameters are chosen on it, never on the test file)."""
    held_out = set(random.Random(seed).sample(range(len(items)), n_val))
    fit.parent.mkdir(parents=True, exist_ok=True)
    fit.write_text("".join(x for i, x in enumerate(items) if i not in held_out))
    val.write_text("".join(x for i, x in enumerate(items) if i in held_out))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _commit() -> str:
    return _git("rev-parse", "--short", "HEAD") + (
        " + uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results") else ""
    )


_STARTED_ON = _commit()  # the code a run imports is the code at its start: later edits or commits do not change it


def stamp(t0: float, load0: tuple[float, float, float]) -> str:
    """The line under a results file's title: the command as typed, the commit the run started on (and whether
    tracked files had changes beyond it then, results files aside; taken when this module is imported, at the
    script's start), the date, the CPUs, the load average before the run (`load0`: what else was running) and at
    its end, the wall seconds since `t0`."""
    commit = _STARTED_ON
    cmd = " ".join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])
    before, end = ("/".join(f"{x:.1f}" for x in la) for la in (load0, os.getloadavg()))
    return (
        f"`{cmd}` (commit {commit}, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {before} "
        f"before, {end} at the end, total {time.time() - t0:.0f} s)"
    )


def count_params(model: Path) -> int:
    """Parameters of the model in `model` (the tiny models are named by size; the count is what they are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model))).num_parameters()


def child(script: str, piece: list[str], args: list[str], lock: str | None, logs: Path) -> dict:
    """Run one piece of a benchmark (`python SCRIPT --one PIECE ARGS`) in a fresh process, under `flock LOCK` when
    given, its stderr in LOGS; return the last JSON line it printed (exit if it failed)."""
    cmd = [sys.executable, script, "--one", json.dumps(piece), *args]
    cmd = (["flock", lock] if lock else []) + cmd
    print("$", " ".join(cmd), flush=True)
    log = logs / f"{'-'.join(Path(p).name for p in piece)[:120]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode or line is None:
        sys.exit(f"{piece} failed (exit {proc.returncode}); see {log}")
    print(line, flush=True)
    return json.loads(line)


class Pieces:
    """A benchmark's figures in one JSON file, by key: each piece measured once, stamped with the script run that
    measured it (a rerun keeps what an earlier run of the same settings measured). `saved`: the figures so far."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.saved: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, key: str, fn, *args) -> dict:
        if key not in self.saved:
            t, load = time.time(), os.getloadavg()
            self.saved[key] = {**fn(*args), "stamp": stamp(t, load)}
            self.save()
        return self.saved[key]

    def save(self) -> None:
        self.path.write_text(json.dumps(self.saved, indent=1))


def one_piece(piece: str, fns: dict) -> None:
    """In a child process: run the piece `[kind, *args]` (JSON) by `fns[kind](*args)`, print its figures as JSON."""
    kind, *args = json.loads(piece)
    print(json.dumps(fns[kind](*args)))


def need_smollm2(base: Path) -> None:
    if not (base / "config.json").exists():
        sys.exit(f"{base}: missing; `ftray models get smollm2-135m-instruct {base.relative_to(ROOT)}` writes it")


def win_rate(prompts: int, judged: dict) -> dict:
    """A judge's `ftray eval` of (policy reply, untouched reply) pairs -> the policy's win rate over every prompt.
    The judge scores only the pairs whose replies differ (`ftray.data.rows` refuses a pair of the same text), so
    its accuracy is the win rate over those; a prompt it skipped (the same reply on both sides) is a tie and
    counts half here, for the win rate and for the rule "the longer reply wins" alike. The balanced subset is
    of the scored pairs."""
    n = judged["rows"]
    ties = prompts - n
    win = (judged["accuracy"] * n + 0.5 * ties) / prompts
    # each prompt scores 1, 0.5 or 0: the standard error of their mean
    square = (judged["accuracy"] * n + 0.25 * ties) / prompts
    return {
        "win": win, "se": max(square - win * win, 0.0) ** 0.5 / prompts**0.5,
        "longer": (judged["length_heuristic_accuracy"] * n + 0.5 * ties) / prompts,
        "scored": n, "ties": ties, "win_scored": judged["accuracy"],
        "balanced_n": round(judged["balanced_pairs"] * n), "balanced_win": judged["balanced_accuracy"],
    }


def win_goal(w: dict) -> str:
    """"A win rate above 50 %", said with its noise: met when it clears 0.5 by two standard errors."""
    k = (w["win"] - 0.5) / w["se"] if w["se"] else float("inf")
    if k > 2:
        return "**met**"
    return f"not shown: {w['win'] - 0.5:+.3f} from 0.5, {k:+.1f} standard errors"
