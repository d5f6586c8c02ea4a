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

from tests.conftest import BIN, ROOT, free_port

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


def _wait_ready(url: str, token: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the job API answers an authorized request (401/403 would mean the token is not in use)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code in (401, 403):
                pytest.fail(f"the head refused its own token ({last})")
        except OSError as e:
            last = repr(e)
        time.sleep(0.5)
    pytest.fail(
        f"the job API on {url} was not ready within {timeout:.0f} s (last: {last}):\n{log.read_text()[-4000:]}"
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
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # Orphans: descendants seen above, and processes whose command line names our private temp dir.
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
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


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    if not RAY.exists():
        pytest.skip(f"no `ray` console script at {RAY}")
    pytest.importorskip("psutil", reason="psutil is needed to stop only this module's Ray processes")
    # Short: Ray puts unix sockets under the temp dir, and their paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjs-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_path = tmp_path_factory.mktemp("rayjs-auth") / "auth_token"
    token_path.write_text(token)
    env = _base_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
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
    log = temp_dir / "ray_start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{dash}"
        _wait_ready(url, token, proc, log)
        yield Head(url, env, token_path, temp_dir)
    finally:
        _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    # Nothing was submitted.
    s = _ray(["job", "status", "--address", head.address, sid], head.env)
    assert s.returncode != 0 and "does not exist" in s.stdout + s.stderr, s.stdout + s.stderr


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

    s = _ray(["job", "status", "--address", head.address, sid], head.env)
    assert f"Job '{sid}' succeeded" in s.stdout + s.stderr, (s.stdout + s.stderr)[-3000:]

    logs = _ray(["job", "logs", "--address", head.address, sid], head.env)
    assert logs.returncode == 0, logs.stderr[-3000:]
    text = logs.stdout
    assert f"run: {out}" in text, text[-4000:]
    assert "[ftray] step 4/4" in text, text[-4000:]
    # The driver joined this cluster (RAY_ADDRESS from the job supervisor) instead of starting its own.
    assert "Started a local Ray instance" not in text, text[-4000:]

    assert (out / "run.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["train"]["steps"] == 4
    assert run["spec"]["output"]["dir"] == str(out)
    for name in ("adapter_config.json", "adapter_model.safetensors", ".complete"):
        assert (out / "adapter" / name).is_file(), sorted(p.name for p in (out / "adapter").iterdir())
    assert (out / "checkpoints").is_dir()


def test_ray_status_needs_the_token(head):
    """The GCS (gRPC) side too: `ray status` works with the token and is refused without RAY_AUTH_MODE."""
    gcs = (head.temp_dir / "ray_current_cluster").read_text().strip()
    ok = _ray(["status", "--address", gcs], head.env, timeout=90)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert "/4.0 CPU" in ok.stdout, ok.stdout[-3000:]
    bad = _ray(["status", "--address", gcs], _refused_env("no-auth-mode", head), timeout=90)
    assert bad.returncode != 0, (bad.stdout + bad.stderr)[-3000:]
    print("UNAUTH STATUS:", (bad.stdout + bad.stderr)[-1500:])
