"""What the benchmarks that drive `ftray` as a user types it share: run one command, read a run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ftray(*args: str) -> float:
    """Run `ftray ARGS` from the repository root (echoed first); raise if it fails; return its wall seconds."""
    t0 = time.time()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "ftray"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return time.time() - t0


def record(run: Path) -> dict:
    """A finished run's run.json."""
    return json.loads((run / "run.json").read_text())


def done(run: Path) -> bool:
    """The run folder holds a completed run (so a rerun of the benchmark can skip it)."""
    return (run / "run.json").exists() and record(run).get("status") == "completed"
