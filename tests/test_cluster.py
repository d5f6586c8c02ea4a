"""`cluster/local.sh`: a real multi-node Ray cluster on this machine (a head and worker nodes, each its own
raylet with a node label) with token auth. A job submitted with the token runs and sees every node; the
same submit without the token, or with a wrong one, is refused; `down` leaves nothing of it running.

The cluster gets its own short temp dir, token file and free ports, so it never touches
~/.ftray/ray_token, ~/.ray or another Ray cluster on this machine; `down` stops only its own processes.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import stat
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._cluster import LIST_NODES, SCRIPT, _ours, _plain_env, _run
from tests._specs import free_port

pytestmark = pytest.mark.integration

@dataclass
class Local:
    dir: Path
    env: dict  # runs local.sh; has no client auth settings
    dashboard: str
    gcs_port: int
    token: Path


@pytest.fixture
def local_cluster(tmp_path, ray_down):  # one Ray instance on the machine: Train's helpers look it up
    if shutil.which("setsid") is None:
        pytest.skip("cluster/local.sh needs `setsid` (util-linux), which this machine lacks")
    psutil = pytest.importorskip("psutil", reason="psutil is needed to check that `down` left nothing running")
    # Short: Ray puts unix sockets under it, and their paths are limited to ~107 bytes.
    cluster_dir = Path(tempfile.mkdtemp(prefix="ftc-", dir="/tmp"))
    token = tmp_path / "auth" / "ray_token"  # absent: `up` must create it
    gcs, dash = free_port(), free_port()
    env = _plain_env()
    env.update(
        FTRAY_CLUSTER_DIR=str(cluster_dir),
        FTRAY_RAY_TOKEN=str(token),
        FTRAY_RAY_PORT=str(gcs),
        FTRAY_DASHBOARD_PORT=str(dash),
        FTRAY_WORKER_CPUS="1",
        FTRAY_OBJECT_STORE_MB="128",
    )
    try:
        yield Local(cluster_dir, env, f"http://127.0.0.1:{dash}", gcs, token)
    finally:
        _run([SCRIPT, "down"], env, timeout=90)
        # Last resort, by pid: anything of this cluster that `down` missed (the test has failed then).
        for p in _ours(cluster_dir):
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(cluster_dir, ignore_errors=True)


def test_local_cluster_up_token_auth_down(local_cluster):
    c = local_cluster
    up = _run([SCRIPT, "up", "1"], c.env, timeout=300)
    assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
    assert c.token.is_file() and stat.S_IMODE(c.token.stat().st_mode) == 0o600
    starts = [int(line.split()[0]) for line in (c.dir / "pids").read_text().splitlines()]
    assert len(starts) == 2  # the head's and the worker's `ray start --block`

    # The client environment `up` writes: token auth on, the token from the file, this cluster's addresses.
    authed = _plain_env()
    for line in (c.dir / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        authed[key] = value
    assert authed["RAY_AUTH_MODE"] == "token" and authed["RAY_AUTH_TOKEN_PATH"] == str(c.token)
    assert authed["RAY_API_SERVER_ADDRESS"] == authed["RAY_DASHBOARD_ADDRESS"] == c.dashboard

    sid = f"ftray-local-{uuid.uuid4().hex[:6]}"
    ok = _run(["ray", "job", "submit", "--submission-id", sid, "--", "python", "-c", LIST_NODES], authed, timeout=180)
    out = ok.stdout + ok.stderr
    assert ok.returncode == 0 and f"Job '{sid}' succeeded" in out, out[-4000:]
    assert "nodes: ['head', 'worker-1']" in out, out[-4000:]  # two raylets, each with its label

    status = _run([SCRIPT, "status"], c.env)
    rows = sorted(line.split()[:2] for line in status.stdout.splitlines())
    assert rows == [["head", "0"], ["worker-1", "1"]], status.stdout + status.stderr

    no_token = {k: v for k, v in authed.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    wrong = {**authed, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for env, says in ((no_token, "Missing authentication token"), (wrong, "Invalid authentication token")):
        bad = _run(["ray", "job", "submit", "--no-wait", "--", "echo", "hi"], env)
        text = bad.stdout + bad.stderr
        assert bad.returncode != 0 and "AuthenticationError" in text and says in text, text[-3000:]
    listed = _run(["ray", "job", "list"], authed)
    assert listed.returncode == 0 and listed.stdout.count("submission_id='ftray-local-") == 1, listed.stdout[-3000:]

    down = _run([SCRIPT, "down"], c.env, timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    import psutil

    assert not [p for p in starts if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not _ours(c.dir), [p.info["cmdline"][:3] for p in _ours(c.dir)]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", c.gcs_port)) != 0  # the GCS is gone
