"""Everything on a cluster of its own, one `cluster/local.sh up 3` (a head with 0 CPUs, 3 worker nodes of 2
CPUs, token auth, every node with the moto S3 endpoint and credentials in its environment, as a cloud
node gets them from its role), in this order:

1. `up`: the token file, a `ray start` per node, the client environment; a job sees every node by label;
   submits without the token, with a wrong one or an unreadable token file are refused, and the GCS too.
2. `ray job submit --working-dir .` of an SFT job with 2 workers under STRICT_SPREAD (one per worker node),
   its model, data, data cache, run folder and checkpoints all on `s3://`; a node running a worker is lost
   mid-run (its raylet and every process of it SIGKILLed): the job restarts from its checkpoint on S3 on the
   nodes left → the adapter downloaded and loaded with peft → `serve deploy` of a config serving that adapter
   and its base from `s3://` → the `openai` client gets a completion with the API key (and a 401 without).
3. `down` leaves nothing running.

One cluster for all three: each `up` costs about a minute on this 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ftray.train.launch import EMBEDDED_RAY_ENV
from tests._cluster import LIST_NODES, SCRIPT, _ours, _plain_env, _run
from tests._specs import ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


def _submit_quickstart(tiny_model, arith, cache_dir, out, *submit_args: str, **sets) -> list:
    """`ray job submit [submit_args] --working-dir . -- ftray train jobs/quickstart_tiny.yaml --set ...` on the test's
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
    return cmd + ["--", "ftray", "train", "jobs/quickstart_tiny.yaml"] + [f"--set={k}={v}" for k, v in over.items()]


@dataclass
class Cluster:
    dir: Path  # FTRAY_CLUSTER_DIR: state, logs, Ray's temp dir
    env: dict  # runs local.sh; has no client auth settings
    authed: dict  # a client environment from the `env` file `up` wrote
    token: Path
    gcs_port: int
    dashboard: str
    starts: list  # pids of each node's `ray start --block` (head first)


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):  # noqa: F811 - s3: every node inherits the moto endpoint and credentials
    """`cluster/local.sh up 3` with its own dir, token (absent: `up` creates it), ports; the module's tests
    run on it in file order (the node-loss test kills a node; the last test takes it down). Always `down`."""
    import ray

    if shutil.which("setsid") is None:
        pytest.skip("cluster/local.sh needs `setsid` (util-linux), which this machine lacks")
    psutil = pytest.importorskip("psutil", reason="psutil is needed to stop only this module's Ray processes")
    if ray.is_initialized():  # one Ray instance on the machine: Train's helpers look their cluster up by "auto"
        ray.shutdown()
    # Short: Ray puts unix sockets under it, and their paths are limited to ~107 bytes.
    cluster_dir = Path(tempfile.mkdtemp(prefix="ftc-", dir="/tmp"))
    token = tmp_path_factory.mktemp("auth") / "ray_token"
    gcs, dash = free_port(), free_port()
    env = _plain_env()  # os.environ holds the moto endpoint and credentials (the s3 fixture)
    # A cluster keeps Ray Train's defaults (a 2 s controller poll, the preemption watcher), whatever an embedded
    # Ray earlier in this process set (ftray/train/launch.py `EMBEDDED_RAY_ENV`).
    for key in EMBEDDED_RAY_ENV:
        env.pop(key, None)
    env.update(
        FTRAY_CLUSTER_DIR=str(cluster_dir),
        FTRAY_RAY_TOKEN=str(token),
        FTRAY_RAY_PORT=str(gcs),
        FTRAY_DASHBOARD_PORT=str(dash),
        FTRAY_WORKER_CPUS="2",
        FTRAY_OBJECT_STORE_MB="256",
    )
    try:
        up = _run([SCRIPT, "up", "3"], env, timeout=600)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        authed = _plain_env()
        for key in EMBEDDED_RAY_ENV:
            authed.pop(key, None)
        for line in (cluster_dir / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            authed[key] = value
        starts = [int(line.split()[0]) for line in (cluster_dir / "pids").read_text().splitlines()]
        yield Cluster(cluster_dir, env, authed, token, gcs, f"http://127.0.0.1:{dash}", starts)
    finally:
        _run([SCRIPT, "down"], env, timeout=120)
        # Last resort, by pid: anything of this cluster that `down` missed (a test has failed then).
        for p in _ours(cluster_dir):
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(cluster_dir, ignore_errors=True)


def _job_info(c: Cluster, sid: str) -> dict | None:
    """GET /api/jobs/<id> with the token: the job's details, or None when there is no such job."""
    req = urllib.request.Request(f"{c.dashboard}/api/jobs/{sid}", headers={"Authorization": f"Bearer {c.token.read_text().strip()}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def test_local_sh_up_token_auth(cluster):
    """`up`: a token file of mode 600, one `ray start` per node, the client environment; a job submitted with
    the token sees every node by its label; without it, with a wrong one or an unreadable token file, the
    job API refuses (nothing is submitted), and so does the GCS."""
    c = cluster
    assert c.token.is_file() and stat.S_IMODE(c.token.stat().st_mode) == 0o600
    assert len(c.starts) == 4  # the head's and 3 workers' `ray start --block`
    assert c.authed["RAY_AUTH_MODE"] == "token" and c.authed["RAY_AUTH_TOKEN_PATH"] == str(c.token)
    assert c.authed["RAY_API_SERVER_ADDRESS"] == c.authed["RAY_DASHBOARD_ADDRESS"] == c.dashboard

    sid = f"ftray-local-{uuid.uuid4().hex[:6]}"
    ok = _run(["ray", "job", "submit", "--submission-id", sid, "--", "python", "-c", LIST_NODES], c.authed, timeout=180)
    out = ok.stdout + ok.stderr
    assert ok.returncode == 0 and f"Job '{sid}' succeeded" in out, out[-4000:]
    assert "nodes: ['head', 'worker-1', 'worker-2', 'worker-3']" in out, out[-4000:]  # a raylet per node, each labelled

    status = _run([SCRIPT, "status"], c.env)
    rows = sorted(line.split()[:2] for line in status.stdout.splitlines())
    assert rows == [["head", "0"], ["worker-1", "2"], ["worker-2", "2"], ["worker-3", "2"]], status.stdout + status.stderr

    plain = {k: v for k, v in c.authed.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    refused = {
        "Missing authentication token": {**plain, "RAY_AUTH_TOKEN_PATH": str(c.token)},  # the file, but no mode: 401
        "Invalid authentication token": {**c.authed, "RAY_AUTH_TOKEN": secrets.token_hex(32)},  # 403
        # Refused on the client's side.
        "RAY_AUTH_TOKEN_PATH is set but file cannot be opened": {**c.authed, "RAY_AUTH_TOKEN_PATH": str(c.dir / "no-such-token")},
    }
    for says, env in refused.items():
        bad_sid = f"ftray-refused-{uuid.uuid4().hex[:6]}"
        bad = _run(["ray", "job", "submit", "--submission-id", bad_sid, "--no-wait", "--", "echo", "hi"], env)
        text = bad.stdout + bad.stderr
        assert bad.returncode != 0 and "AuthenticationError" in text and says in text, text[-3000:]
        assert _job_info(c, bad_sid) is None  # nothing was submitted
    listed = _run(["ray", "job", "list"], c.authed)
    assert listed.returncode == 0 and listed.stdout.count("submission_id='ftray-local-") == 1, listed.stdout[-3000:]
    # The GCS (gRPC) side too. (With the token it works: each job's driver connects through it.)
    gcs = _run(["ray", "status", "--address", f"127.0.0.1:{c.gcs_port}"], {**plain, "RAY_AUTH_TOKEN_PATH": str(c.token)}, timeout=90)
    text = gcs.stdout + gcs.stderr
    assert gcs.returncode != 0 and "AuthenticationError" in text and "InvalidAuthToken" in text, text[-3000:]


def _wait_serve_running(c: Cluster, app: str = "ftray", timeout: float = 240) -> None:
    """Polls the dashboard's Serve REST API (what `serve status` reads; with the token) every 0.5 s until `app`
    is RUNNING: a `serve status` CLI start costs ~2 s of CPU here."""
    deadline, got = time.time() + timeout, {}
    while time.time() < deadline:
        req = urllib.request.Request(f"{c.dashboard}/api/serve/applications/",
                                     headers={"Authorization": f"Bearer {c.token.read_text().strip()}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                got = json.loads(r.read()).get("applications", {}).get(app, {})
        except (urllib.error.URLError, json.JSONDecodeError) as e:
            got = {"error": repr(e)}
        if got.get("status") == "RUNNING":
            return
        assert got.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), json.dumps(got)[-4000:]
        time.sleep(0.5)
    pytest.fail(f"the Serve app did not reach RUNNING within {timeout:.0f} s:\n{json.dumps(got)[-4000:]}")


JOB_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")  # the job API's status once a job has ended


def _node_sessions(cluster_dir: Path) -> dict:
    """local.sh's node name of each node's session id (`setsid ray start --block`: its pid)."""
    return {int(pid): name for pid, name in (line.split()[:2] for line in (cluster_dir / "pids").read_text().splitlines())}


def _train_worker_nodes(cluster_dir: Path) -> list[str]:
    """The nodes of this cluster running a live Ray Train worker process, from the process table."""
    import psutil

    nodes = _node_sessions(cluster_dir)
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and os.getsid(p.pid) in nodes:
                found.append(nodes[os.getsid(p.pid)])
        except (psutil.Error, ProcessLookupError):
            pass
    return sorted(found)


def _kill_node(cluster_dir: Path, node: str) -> int:
    """The machine of local.sh's node `node` lost: SIGKILL its raylet, then every other process of that node's
    session (its workers too: killing the raylet alone leaves them to notice it over seconds, long enough
    for a short job to finish first). Returns how many processes were killed."""
    import psutil

    sid = {name: pid for pid, name in _node_sessions(cluster_dir).items()}[node]
    procs = []
    for p in psutil.process_iter(["name"]):
        try:
            if os.getsid(p.pid) == sid:
                procs.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    assert any(p.info["name"] == "raylet" for p in procs), f"no raylet found in the session of node {node}"
    for p in sorted(procs, key=lambda p: p.info["name"] != "raylet"):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    return len(procs)


def test_two_node_job_on_s3_loses_a_node_resumes_then_is_served(cluster, s3_inputs, tiny_model, arith, cache_dir, tmp_path):
    """A 2-worker STRICT_SPREAD job on 3 worker nodes, its model, data, data cache, run folder and checkpoints
    all on S3 (the nodes reach them as a cloud node does: the endpoint and credentials in their environment).
    A node running a worker is lost (SIGKILL) after the first checkpoint: Ray Train restarts the worker group
    on the 2 nodes left from the checkpoint on S3, and the job finishes. The adapter it wrote is downloaded and
    loaded with peft, then served from S3 over the model on S3 (`serve deploy`, the `openai` client).

    One job for both stories (a job on S3, a node lost): each `ray job submit` of the working dir and each
    2-worker start costs ~40 s on this 2-core machine."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftray import storage

    # The kill lands once Ray Train has registered the first checkpoint (the driver's "stored" line, after its
    # background upload and the controller's next 2 s poll; the job driver's log lags a second or more):
    # 30-60 steps after it with checkpoints on local disk, 15 with them on S3 (2026-12-04), so the first at
    # step 64 of 320 leaves room on a machine 3x as fast. A checkpoint every 64 steps, not 8: the controller
    # registers one report per 2 s poll, and after the restart (~0.035 s a step) 39 checkpoints of 8 steps
    # queued up and the run ended 40 s after its last step (2026-12-03).
    steps, every = 320, 64
    authed, cluster_dir, prefix = cluster.authed, cluster.dir, s3_inputs["prefix"]
    out, cache = f"{prefix}/runs/e2e-{uuid.uuid4().hex[:6]}", f"{prefix}/cache"
    sid = f"ftray-e2e-{uuid.uuid4().hex[:6]}"
    cmd = _submit_quickstart(
        tiny_model, arith, cache_dir, out, "--no-wait", "--submission-id", sid,
        model__path=s3_inputs["model"], data__train=s3_inputs["train"], data__eval=s3_inputs["eval"], data__cache_dir=cache,
        scaling__max_failures=2, train__max_steps=steps, train__checkpoint_every=every, train__log_every=1,
    )  # fmt: skip
    sub = _run(cmd, authed, timeout=300)
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-4000:]

    def status() -> str:
        r = _run(["ray", "job", "status", sid], authed, timeout=120)
        return r.stdout + r.stderr

    # The job driver's log on the head (what `ray job logs` serves), read from disk: polling it costs no
    # CLI start-up, so the kill lands within a step or two of the checkpoint.
    def logs() -> str:
        found = list((cluster_dir / "ray").glob(f"session_*/logs/job-driver-{sid}.log"))
        return found[0].read_text(errors="replace") if found else ""

    # Wait until Ray Train has registered the first checkpoint: files on S3 are not enough (an upload in
    # flight, `output.checkpoint_upload: async`, is not resumed from).
    deadline, polls = time.time() + 600, 0
    while time.time() < deadline:
        if re.search(r"\[ftray\] checkpoint at step \d+ stored: ", logs()):
            break
        polls += 1
        if polls % 20 == 0:
            assert (_job_info(cluster, sid) or {}).get("status") not in JOB_ENDED, logs()[-4000:]
        time.sleep(0.1)
    else:
        pytest.fail(f"no checkpoint stored within 600 s:\n{logs()[-4000:]}")
    nodes = _train_worker_nodes(cluster_dir)
    assert len(nodes) == 2 and len(set(nodes)) == 2 and "head" not in nodes, nodes
    victim = nodes[-1]
    killed = _kill_node(cluster_dir, victim)
    assert killed >= 2, killed  # its raylet and at least the Ray Train worker
    t_kill = time.time()

    # The job's end, from the dashboard's job API every 0.5 s (`ray job status` is a CLI start, ~2 s of CPU
    # here), then once from the CLI. (The surviving worker's traceback, gloo's "Connection closed by peer", is
    # in the log: the restart follows.)
    deadline = time.time() + 900
    while time.time() < deadline and (_job_info(cluster, sid) or {}).get("status") not in JOB_ENDED:
        time.sleep(0.5)
    st, text = status(), logs()
    assert f"Job '{sid}' succeeded" in st, st + text[-6000:]
    took = time.time() - t_kill
    info = _job_info(cluster, sid)
    assert info is not None and info["status"] == "SUCCEEDED", info
    # The driver joined this cluster (ray.init found RAY_ADDRESS set by the job supervisor) rather than
    # starting an embedded Ray: only a driver connected to the cluster gets a Ray job id.
    assert info["job_id"] and info["driver_info"], info
    assert f"run: {out}" in text and f"[ftray] step {steps}/{steps}" in text, text[-4000:]

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
    assert every <= from_step < steps and from_step % every == 0, from_step
    assert max(map(int, losses[0])) < steps, "the first attempt trained to the end: the kill came too late"

    # The run folder on S3: record, curve (the checkpoint's history, then the steps after it), checkpoints,
    # tokenizer, the committed adapter.
    run = json.loads(storage.read_text(storage.join(out, "run.json")))
    assert run["status"] == "completed" and run["train"]["steps"] == steps and run["spec"]["output"]["dir"] == out
    assert run["train"]["resumed_from_step"] == from_step and run["base_model"] == s3_inputs["model"]
    names = storage.listdir(out)
    for n in ("run.json", "adapter", "metrics.jsonl", "checkpoints", "tokenizer"):
        assert n in names, f"{out} lacks {n}: {names}"
    metrics = [json.loads(x) for x in storage.read_text(f"{out}/metrics.jsonl").splitlines() if x.strip()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, steps + 1))
    assert any(n.startswith("checkpoint_") for n in storage.listdir(f"{out}/checkpoints")), storage.listdir(f"{out}/checkpoints")
    for name in (".complete", "adapter_config.json", "adapter_model.safetensors"):
        assert storage.exists(storage.join(out, "adapter", name)), name
    # The prepared data went to the S3 cache.
    assert storage.exists(f"{cache}/{run['data_hash']}/meta.json"), storage.listdir(cache)
    # After the restart: one rank on each of the 2 worker nodes left (the head has 0 CPUs).
    ranks = run["placement"]["ranks"]
    assert run["placement"]["strategy"] == "STRICT_SPREAD" and [r["rank"] for r in ranks] == [0, 1]
    placed = sorted(r["labels"].get("ftray.io/node") for r in ranks)
    assert victim not in placed and len(set(placed)) == 2 and set(placed) <= {"worker-1", "worker-2", "worker-3"}, (victim, ranks)
    assert len({r["node_id"] for r in ranks}) == 2, ranks
    print(
        f"node {victim} lost at step {max(map(int, losses[0]))}; restarted on {placed} from the step-{from_step} checkpoint "
        f"on S3: {len(redone)} steps redone (same losses); job finished {took:.0f} s after the kill"
    )

    # The adapter, downloaded, loads with peft on the tiny base; its trained weights were saved (lora_B
    # starts at zero; ZeRO-2, rank 0 wrote it).
    local = storage.download_dir(f"{out}/adapter", tmp_path / "adapter")
    assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] == s3_inputs["model"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(local))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == base.config.vocab_size

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
                            "base": s3_inputs["model"],  # the model and the run folder on S3
                            "adapters": {"e2e": out},
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
    _wait_serve_running(cluster)

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


def test_local_sh_down_leaves_nothing_running(cluster):
    """Last in the module: `down` stops every node's `ray start` and everything in their sessions."""
    import psutil

    c = cluster
    down = _run([SCRIPT, "down"], c.env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [p for p in c.starts if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not _ours(c.dir), [p.info["cmdline"][:3] for p in _ours(c.dir)]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", c.gcs_port)) != 0  # the GCS is gone
