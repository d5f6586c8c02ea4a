"""End to end on a real multi-node cluster: `cluster/local.sh up 2` → `ray job submit --working-dir .` of an
SFT job with 2 workers under STRICT_SPREAD (one per worker node) → its run folder on `s3://` (moto_server
on loopback) → `serve deploy` of a config serving that adapter from `s3://` → the `openai` client gets a
completion with the API key (and a 401 without) → `down`.

Every node inherits AWS_ENDPOINT_URL and the moto credentials from `local.sh up`'s environment, as a
cloud node would get them from its role. Slow (about 3 minutes on 2 loaded cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests._cluster import SCRIPT, _ours, _plain_env, _run
from tests._s3 import BUCKET
from tests._specs import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


def _submit_quickstart(tiny_model, arith, cache_dir, out, *submit_args: str, **sets) -> list:
    """`ray job submit [submit_args] --working-dir . -- ftray train jobs/quickstart.yaml --set ...` on the test's
    tiny model and data, spread one rank per worker node; `sets` (dotted keys as `a__b`) add or override."""
    over = {
        "model.path": tiny_model.resolve(),
        "data.train": arith[0].resolve(),
        "data.eval": arith[1].resolve(),
        "data.cache_dir": cache_dir.resolve(),
        "output.dir": out,
        "scaling.placement_strategy": "STRICT_SPREAD",
        "train.eval_every": "null",
        "method.exact_match": "false",
        **{k.replace("__", "."): v for k, v in sets.items()},
    }
    cmd = ["ray", "job", "submit", *submit_args, "--working-dir", ROOT, "--runtime-env-json", json.dumps({"excludes": EXCLUDES})]
    return cmd + ["--", "ftray", "train", "jobs/quickstart.yaml"] + [f"--set={k}={v}" for k, v in over.items()]


@contextlib.contextmanager
def _local_cluster(workers: int, tmp_path: Path):
    """`cluster/local.sh up N` with its own dir, token, ports; yields (client env, cluster dir); always `down`."""
    if shutil.which("setsid") is None:
        pytest.skip("cluster/local.sh needs `setsid` (util-linux), which this machine lacks")
    psutil = pytest.importorskip("psutil", reason="psutil is needed to stop only this test's Ray processes")
    cluster_dir = Path(tempfile.mkdtemp(prefix="ftc2-", dir="/tmp"))
    env = _plain_env()  # os.environ holds the moto endpoint and credentials (the s3 fixture) when it is used
    env.update(
        FTRAY_CLUSTER_DIR=str(cluster_dir),
        FTRAY_RAY_TOKEN=str(tmp_path / "auth" / "ray_token"),
        FTRAY_RAY_PORT=str(free_port()),
        FTRAY_DASHBOARD_PORT=str(free_port()),
        FTRAY_WORKER_CPUS="2",
        FTRAY_OBJECT_STORE_MB="256",
    )
    try:
        up = _run([SCRIPT, "up", str(workers)], env, timeout=150 + 150 * workers)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        authed = _plain_env()
        for line in (cluster_dir / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            authed[key] = value
        yield authed, cluster_dir
    finally:
        _run([SCRIPT, "down"], env, timeout=120)
        for p in _ours(cluster_dir):
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(cluster_dir, ignore_errors=True)


@pytest.fixture
def two_nodes(s3, tmp_path, ray_down):  # noqa: F811 - ray_down: one Ray instance on the machine
    assert _plain_env()["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    with _local_cluster(2, tmp_path) as (authed, _):
        yield authed


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
    cmd = _submit_quickstart(tiny_model, arith, cache_dir, out, train__max_steps=4, train__checkpoint_every="null")
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
    assert (
        done.model == "tiny:e2e"
        and isinstance(done.choices[0].text, str)
        and done.usage.completion_tokens >= 1
    )
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer wrong"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401


# Labels of the nodes running a live Ray Train worker, read from the dashboard's state API.
TRAIN_NODES = """
import json, os
from ray.util.state import list_actors, list_nodes
url = os.environ["RAY_DASHBOARD_ADDRESS"]
labels = {n.node_id: n.labels.get("ftray.io/node", "?") for n in list_nodes(address=url, detail=True, raise_on_missing_output=False)}
alive = list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
print(json.dumps(sorted(labels.get(a.node_id, "?") for a in alive)))
"""


ENDED = r"Job '[^']+' (succeeded|failed|was stopped|stopped)"  # `ray job status` once the job has ended


def _kill_raylet(cluster_dir: Path, node: str) -> int:
    """SIGKILL the raylet of local.sh's node `node` (found in that node's session); returns its pid."""
    import psutil

    starts = dict(reversed(line.split()) for line in (cluster_dir / "pids").read_text().splitlines())
    sid = int(starts[node])  # `setsid ray start --block`: its pid is the node's session id
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "raylet" and os.getsid(p.pid) == sid:
                p.send_signal(signal.SIGKILL)
                return p.pid
        except (psutil.Error, ProcessLookupError):
            pass
    raise AssertionError(f"no raylet found in the session of node {node}")


def test_worker_node_lost_mid_run_restarts_from_checkpoint(tiny_model, arith, cache_dir, tmp_path, ray_down):
    """3 worker nodes, a 2-worker STRICT_SPREAD job; the raylet of a node running a worker is SIGKILLed after the
    first checkpoint: Ray Train restarts the worker group on the 2 nodes left and the job finishes from it."""
    steps, every = 20, 5  # killed after step 7+: the restart and the steps left still run mid-job
    with _local_cluster(3, tmp_path) as (authed, cluster_dir):
        out = tmp_path / "run"  # one machine: every node sees this folder (a cluster would use s3://)
        sid = f"ftray-nodeloss-{uuid.uuid4().hex[:6]}"
        cmd = _submit_quickstart(
            tiny_model, arith, cache_dir, out, "--no-wait", "--submission-id", sid,
            scaling__max_failures=2, train__max_steps=steps, train__checkpoint_every=every, train__log_every=1,
        )  # fmt: skip
        sub = _run(cmd, authed, timeout=300)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]

        def logs() -> str:
            r = _run(["ray", "job", "logs", sid], authed, timeout=120)
            return r.stdout + r.stderr

        def status() -> str:
            r = _run(["ray", "job", "status", sid], authed, timeout=120)
            return r.stdout + r.stderr

        # Wait until the first checkpoint is registered (progress two steps past it) while the job runs.
        deadline, text = time.time() + 600, ""
        while time.time() < deadline:
            text = logs()
            done = [int(m) for m in re.findall(rf"\[ftray\] step (\d+)/{steps}", text)]
            if done and max(done) >= every + 2 and list((out / "checkpoints").glob("checkpoint_*")):
                break
            assert not re.search(ENDED, status()), text[-4000:]
            time.sleep(3)
        else:
            pytest.fail(f"no checkpoint within 600 s:\n{text[-4000:]}")
        r = _run(["python", "-c", TRAIN_NODES], authed, timeout=120)
        nodes = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else []
        assert len(nodes) == 2 and len(set(nodes)) == 2, r.stdout + r.stderr
        victim = nodes[-1]
        step_at_kill = max(int(m) for m in re.findall(rf"\[ftray\] step (\d+)/{steps}", logs()))
        _kill_raylet(cluster_dir, victim)
        t_kill = time.time()

        deadline = time.time() + 900
        while time.time() < deadline and not re.search(ENDED, st := status()):
            time.sleep(5)
        text = logs()
        assert f"Job '{sid}' succeeded" in st, st + text[-6000:]
        took = time.time() - t_kill

    resumed = re.findall(rf"resumed from checkpoint at step (\d+)/{steps}", text)
    assert resumed, text[-6000:]
    from_step = int(resumed[0])
    # The steps run twice give the same loss: the restart continued the run exactly from the checkpoint.
    before, after = text.split(f"resumed from checkpoint at step {from_step}/{steps}", 1)
    losses = [
        dict(re.findall(rf"\[ftray\] step (\d+)/{steps} loss ([\d.]+)", part)) for part in (before, after)
    ]
    redone = sorted(set(losses[0]) & set(losses[1]), key=int)
    assert redone and all(losses[0][k] == losses[1][k] for k in redone), (losses, redone)
    assert every <= from_step <= step_at_kill and from_step % every == 0, (from_step, step_at_kill)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["train"]["steps"] == steps
    placed = sorted(r["labels"].get("ftray.io/node") for r in run["placement"]["ranks"])
    assert victim not in placed and len(set(placed)) == 2, (victim, placed)
    print(
        f"node {victim} lost at step >= {step_at_kill}; restarted on {placed} from the step-{from_step} checkpoint: "
        f"{len(redone)} steps redone (same losses); job finished {took:.0f} s after the kill"
    )
