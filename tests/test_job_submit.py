"""`ray job submit` of `ftray train` to a real head node started with `ray start --head` and token auth.

The head gets its own token file (RAY_AUTH_TOKEN_PATH) and its own short --temp-dir, so it neither
reads nor writes ~/.ray/auth_token and never shares state with other Ray clusters on this machine.
Teardown signals only the `ray start --block` process this module started and its descendants:
`ray stop` is not used because it kills every Ray process on the machine, other people's included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._specs import BIN, ROOT, free_port

pytestmark = pytest.mark.integration

RAY = BIN / "ray"
CLIENT_AUTH_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# What the working-dir upload leaves out beyond .gitignore (which Ray 2.60 honours already).
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


@dataclass
class Head:
    address: str  # the dashboard (job submission) address
    env: dict  # an authorized client environment
    token_path: Path
    temp_dir: Path


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_AUTH_VARS}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `ftray` and `ray` from this venv
    return env


def _ray(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RAY), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _job_info(head: Head, sid: str) -> dict | None:
    """GET /api/jobs/<id> with the token: the job's details, or None when there is no such job."""
    token = head.token_path.read_text().strip()
    req = urllib.request.Request(
        f"{head.address}/api/jobs/{sid}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _wait_ready(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> bool:
    """Until the head accepts a job with the token: a no-op job, submitted over REST and retried while
    the head says "No available agent" (its job API answers before the node's agent has registered).
    False when `ray start` exited instead (on an overloaded machine its node start-up can time out)."""
    deadline = time.time() + timeout
    body = json.dumps(
        {"entrypoint": "true", "submission_id": f"ftray-warmup-{uuid.uuid4().hex[:6]}"}
    ).encode()
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        req = urllib.request.Request(
            f"{url}/api/jobs/",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 200:
                    return True
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200]!r}"
            if e.code in (401, 403):
                pytest.fail(f"the head refused its own token ({last})")
        except OSError as e:
            last = repr(e)
        time.sleep(1)
    pytest.fail(
        f"the head on {url} took no job within {timeout:.0f} s (last: {last}):\n{log.read_text()[-4000:]}"
    )


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    """SIGTERM `ray start --block` (it stops its node), then kill by pid whatever of ours is left."""
    import psutil

    try:
        ours = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ours = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # Orphans: descendants seen above, and processes whose command line names our private temp dir.
    td = str(temp_dir)
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(a.endswith(td) or td + "/" in a for a in p.info["cmdline"] or []):
                ours.append(p)
        except psutil.Error:
            pass
    for p in ours:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(ours, timeout=10)


def _start_head(env: dict) -> tuple[subprocess.Popen, Path, str]:
    # Short: Ray puts unix sockets under the temp dir, and their paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjs-", dir="/tmp"))
    dash = free_port()
    cmd = [
        str(RAY), "start", "--head", "--block",
        f"--port={free_port()}",
        "--num-cpus=4",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        # Every port with a fixed default gets a free one: another Ray on this machine may hold it.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(temp_dir / "ray_start.log", "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return proc, temp_dir, f"http://127.0.0.1:{dash}"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray

    if not RAY.exists():
        pytest.skip(f"no `ray` console script at {RAY}")
    if ray.is_initialized():  # one Ray instance on the machine: Train's helpers look their cluster up by "auto"
        ray.shutdown()
    pytest.importorskip("psutil", reason="psutil is needed to stop only this module's Ray processes")
    token = secrets.token_hex(32)
    token_path = tmp_path_factory.mktemp("rayjs-auth") / "auth_token"
    token_path.write_text(token)
    env = _base_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    for _ in (1, 2):  # Ray gives its node 30 s to register: a busy machine may miss that once
        proc, temp_dir, url = _start_head(env)
        try:
            if _wait_ready(url, token, proc, temp_dir / "ray_start.log"):
                yield Head(url, env, token_path, temp_dir)
                return
            failure = (temp_dir / "ray_start.log").read_text()[-4000:]
        finally:
            _stop(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    pytest.fail(f"`ray start --head` failed twice; the last log:\n{failure}")


def _refused_env(case: str, head: Head) -> dict:
    env = _base_env()
    if case == "no-auth-mode":  # the token file is there, but the client is not told to use it
        env["RAY_AUTH_TOKEN_PATH"] = str(head.token_path)
    elif case == "token-path-missing":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head.temp_dir / "no-such-token"))
    elif case == "wrong-token":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    return env


@pytest.mark.parametrize(
    "case, says",
    [
        ("no-auth-mode", "Missing authentication token"),  # HTTP 401
        ("token-path-missing", "RAY_AUTH_TOKEN_PATH is set but file cannot be opened"),  # refused client-side
        ("wrong-token", "Invalid authentication token"),  # HTTP 403
    ],
)
def test_submit_without_token_is_refused(head, case, says):
    sid = f"ftray-refused-{case}-{uuid.uuid4().hex[:6]}"
    r = _ray(
        ["job", "submit", "--address", head.address, "--submission-id", sid, "--no-wait", "--", "echo", "hi"],
        _refused_env(case, head),
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "AuthenticationError" in out and says in out, out[-3000:]
    assert _job_info(head, sid) is None  # nothing was submitted


def test_job_submit_trains(head, tiny_model, arith, cache_dir, tmp_path):
    out = (tmp_path / "run").resolve()  # absolute: the job runs in a copy of the working dir
    sid = f"ftray-test-{uuid.uuid4().hex[:8]}"
    sets = {
        "model.path": tiny_model.resolve(),
        "data.train": arith[0].resolve(),
        "data.eval": arith[1].resolve(),
        "output.dir": out,
        "data.cache_dir": cache_dir.resolve(),
        "train.max_steps": 4,
        "train.eval_every": "null",
        "train.checkpoint_every": "null",
        "method.exact_match": "false",
    }
    cmd = ["job", "submit", "--address", head.address, "--submission-id", sid, "--working-dir", str(ROOT)]
    cmd += ["--runtime-env-json", json.dumps({"excludes": EXCLUDES})]
    cmd += ["--", "ftray", "train", "jobs/quickstart.yaml"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    r = _ray(cmd, head.env, timeout=480)
    submit_out = r.stdout + r.stderr
    assert r.returncode == 0, submit_out[-6000:]

    assert f"Job '{sid}' succeeded" in submit_out, submit_out[-6000:]
    info = _job_info(head, sid)
    assert info is not None and info["status"] == "SUCCEEDED", info
    # The driver joined this cluster (ray.init found RAY_ADDRESS set by the job supervisor) rather than
    # starting an embedded one: only a driver connected to the cluster gets a Ray job id.
    assert info["job_id"] and info["driver_info"], info

    logs = _ray(["job", "logs", "--address", head.address, sid], head.env)
    assert logs.returncode == 0, logs.stderr[-3000:]
    text = logs.stdout
    assert f"run: {out}" in text, text[-4000:]
    assert "[ftray] step 4/4" in text, text[-4000:]

    assert (out / "run.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["train"]["steps"] == 4
    assert run["spec"]["output"]["dir"] == str(out)
    # Where each rank ran: both on the head, the only node.
    ranks = run["placement"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and len({(r["node_id"], r["node_ip"]) for r in ranks}) == 1, ranks
    for name in ("adapter_config.json", "adapter_model.safetensors", ".complete"):
        assert (out / "adapter" / name).is_file(), sorted(p.name for p in (out / "adapter").iterdir())
    assert (out / "checkpoints").is_dir()


def test_ray_status_without_auth_mode_is_refused(head):
    """The GCS (gRPC) side too. (With the token it works: the job's driver connects through it.)"""
    gcs = (head.temp_dir / "ray_current_cluster").read_text().strip()
    bad = _ray(["status", "--address", gcs], _refused_env("no-auth-mode", head), timeout=90)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out[-3000:]
    assert "AuthenticationError" in out and "InvalidAuthToken" in out, out[-3000:]
