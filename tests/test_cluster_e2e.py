"""End to end on a real multi-node cluster: `cluster/local.sh up 2` → `ray job submit --working-dir .` of an
SFT job with 2 workers under STRICT_SPREAD (one per worker node) → its run folder on `s3://` (moto_server
on loopback) → `serve deploy` of a config serving that adapter from `s3://` → the `openai` client gets a
completion with the API key (and a 401 without) → `down`.

Every node inherits AWS_ENDPOINT_URL and the moto credentials from `local.sh up`'s environment, as a
cloud node would get them from its role. Slow (about 3 minutes on 2 loaded cores).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.test_cluster import SCRIPT, _ours, _plain_env, _run
from tests.test_s3 import BUCKET, s3  # noqa: F401 - the moto_server fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


@pytest.fixture
def two_nodes(s3, tmp_path, ray_down):  # noqa: F811 - ray_down: one Ray instance on the machine
    if shutil.which("setsid") is None:
        pytest.skip("cluster/local.sh needs `setsid` (util-linux), which this machine lacks")
    psutil = pytest.importorskip("psutil", reason="psutil is needed to stop only this test's Ray processes")
    cluster_dir = Path(tempfile.mkdtemp(prefix="ftc2-", dir="/tmp"))
    env = _plain_env()  # os.environ holds the moto endpoint and credentials (the s3 fixture)
    assert env["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    env.update(
        FTRAY_CLUSTER_DIR=str(cluster_dir),
        FTRAY_RAY_TOKEN=str(tmp_path / "auth" / "ray_token"),
        FTRAY_RAY_PORT=str(free_port()),
        FTRAY_DASHBOARD_PORT=str(free_port()),
        FTRAY_WORKER_CPUS="2",
        FTRAY_OBJECT_STORE_MB="256",
    )
    try:
        up = _run([SCRIPT, "up", "2"], env, timeout=400)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        authed = _plain_env()
        for line in (cluster_dir / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            authed[key] = value
        yield authed
    finally:
        _run([SCRIPT, "down"], env, timeout=120)
        for p in _ours(cluster_dir):
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(cluster_dir, ignore_errors=True)


def _wait_serve_running(authed: dict, timeout: float = 240) -> None:
    deadline, out = time.time() + timeout, ""
    while time.time() < deadline:
        r = _run(["serve", "status"], authed)
        out = r.stdout + r.stderr
        status = yaml.safe_load(r.stdout) if r.returncode == 0 else None
        app = (status or {}).get("applications", {}).get("ftray", {})
        if app.get("status") == "RUNNING":
            return
        assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), out[-4000:]
        time.sleep(3)
    pytest.fail(f"the Serve app did not reach RUNNING within {timeout:.0f} s:\n{out[-4000:]}")


def test_two_node_job_to_s3_then_serve_deploy(two_nodes, tiny_model, arith, cache_dir, tmp_path):
    from ftray import storage

    authed = two_nodes
    out = f"s3://{BUCKET}/runs/e2e-{uuid.uuid4().hex[:6]}"
    sets = {
        "model.path": tiny_model.resolve(),
        "data.train": arith[0].resolve(),
        "data.eval": arith[1].resolve(),
        "data.cache_dir": cache_dir.resolve(),
        "output.dir": out,
        "scaling.placement_strategy": "STRICT_SPREAD",
        "train.max_steps": 4,
        "train.eval_every": "null",
        "train.checkpoint_every": "null",
        "method.exact_match": "false",
    }
    cmd = ["ray", "job", "submit", "--working-dir", ROOT, "--runtime-env-json", json.dumps({"excludes": EXCLUDES})]
    cmd += ["--", "ftray", "train", "jobs/quickstart.yaml"] + [f"--set={k}={v}" for k, v in sets.items()]
    job = _run(cmd, authed, timeout=600)
    text = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in text, text[-6000:]

    run = json.loads(storage.read_text(storage.join(out, "run.json")))
    assert run["status"] == "completed" and run["train"]["steps"] == 4
    ranks = run["placement"]["ranks"]
    assert run["placement"]["strategy"] == "STRICT_SPREAD"
    assert sorted(r["labels"].get("ftray.io/node") for r in ranks) == ["worker-1", "worker-2"], ranks
    assert len({r["node_id"] for r in ranks}) == 2, ranks
    assert storage.exists(storage.join(out, "adapter", ".complete"))

    key = secrets.token_hex(16)
    keys = tmp_path / "api_keys"
    keys.write_text(key + "\n")
    port = free_port()
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "ftray",
                "route_prefix": "/",
                "import_path": "ftray.serve.app:build_app",
                "args": {
                    "generation": [
                        {
                            "name": "tiny",
                            "base": str(tiny_model.resolve()),
                            "adapters": {"e2e": out},  # the run folder on S3
                            "deployment": {"num_cpus": 0.5, "max_batch_size": 4, "max_ongoing_requests": 8},
                        }
                    ],
                    "auth": {"api_keys_env": None, "api_keys_file": str(keys)},
                },
            }
        ],
    }
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config))
    dep = _run(["serve", "deploy", cfg], authed, timeout=120)
    assert dep.returncode == 0, (dep.stdout + dep.stderr)[-4000:]
    _wait_serve_running(authed)

    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=120, max_retries=2)
    done = client.completions.create(model="tiny:e2e", prompt="2+3=", max_tokens=4, temperature=0)
    assert done.model == "tiny:e2e" and isinstance(done.choices[0].text, str) and done.usage.completion_tokens >= 1
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401
