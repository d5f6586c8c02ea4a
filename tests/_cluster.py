"""Helpers for the tests that start Ray clusters of their own (`cluster/local.sh`, `ray start`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests._specs import BIN, ROOT

SCRIPT = ROOT / "cluster" / "local.sh"
CLIENT_AUTH_VARS = (
    "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
)  # fmt: skip
# Prints the ftray.io/node label of every alive node, from inside a job on the cluster.
LIST_NODES = "import ray; ray.init(); print('nodes:', sorted(n['Labels'].get('ftray.io/node', '?') for n in ray.nodes() if n['Alive']))"



def _plain_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_AUTH_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args: list, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _ours(cluster_dir: Path) -> list:
    """Processes whose command line names this cluster's directory."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(cluster_dir) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            pass
    return found
