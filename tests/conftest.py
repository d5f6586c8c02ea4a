"""Shared fixtures: tiny models built from a config, the arithmetic task, one local Ray for the session,
the run farm, the shared data.

Test order (`pytest_collection_modifyitems`): first everything that needs no Ray (unit tests, in-process
runs, and the checks that a refused job never started Ray), then every test on the session's one local
Ray (started once, on first use), then the modules that need a cluster of their own (a `ray start` head,
`cluster/local.sh`, an S3 endpoint in Ray's environment): they shut the session's Ray down first. With
`-n 2 --dist loadgroup` the first part runs in one pytest-xdist worker and the rest, in order, in the other."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._methods_tiny import build_tiny_bert
from tests._runs import RunFarm
from tests._s3 import s3, s3_inputs  # noqa: F401 - session fixtures: moto_server, the tiny model and data on it
from tests._specs import SHARED_DATA

# Modules that start (or need) a Ray cluster of their own; they run last.
OWN_CLUSTER = {"test_cluster_e2e.py"}


def _group(item) -> int:
    if item.path.name in OWN_CLUSTER:
        return 2
    # `integration` without the fixture in its signature: a test that asks for `ray_local` as it runs
    # (tests/_specs.py `fit`); after the refusal tests, which shut Ray down to show it never started.
    return 1 if "ray_local" in item.fixturenames or item.get_closest_marker("integration") else 0


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_group)  # stable: the file order holds within each group
    # Under `pytest -n 2 --dist loadgroup` (`make test`): the tests that need no Ray in one worker, everything
    # on Ray (the session's Ray, then the own-cluster modules) in order in the other, side by side. One
    # Ray-using process at a time on the machine, as before; the Ray stream spends much of its time waiting on
    # Ray's processes to start, which leaves a core to the other.
    # The group is the `@name` suffix of a node id that loadgroup schedules by, set here as pytest-xdist 3.8 sets
    # it for an `xdist_group` mark: it writes `item._nodeid`, which pytest 9 no longer reads (the id is a NodeId
    # in `item._id`), so its marks were ignored and both streams ran on Ray.
    if getattr(config.option, "loadgroup", False):
        for item in items:
            _set_nodeid(item, f"{item.nodeid}@{'ray' if _group(item) else 'no-ray'}")


def _set_nodeid(item, nodeid: str) -> None:
    if hasattr(item, "_id"):  # pytest >= 9
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(nodeid)
    else:
        item._nodeid = nodeid


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ftray")


@pytest.fixture(scope="session")
def arith(work) -> tuple[Path, Path]:
    from ftray.data.synthetic import write_arithmetic

    return write_arithmetic(work / "arith")


@pytest.fixture(scope="session")
def tiny_model(work, arith) -> Path:
    """A nano Llama whose tokenizer was trained on the arithmetic task (and gpteacher code if present)."""
    from ftray.models.tiny import build_tiny

    corpus = [str(arith[0])]
    code = SHARED_DATA / "sft" / "gpteacher_code_train.jsonl"
    if code.exists():
        corpus.append(str(code))
    return build_tiny(work / "tiny-nano", size="nano", corpus=corpus)


@pytest.fixture(scope="session")
def tiny_bert(work, tiny_model) -> Path:
    """A tiny random-init BERT with the tiny Llama's tokenizer (it has `<mask>` and `<pad>`)."""
    return build_tiny_bert(tiny_model, work / "tiny-bert")


@pytest.fixture(scope="session")
def cache_dir(work) -> Path:
    """One data cache for the whole session: jobs over the same data and tokenizer prepare once."""
    return work / "cache"


@pytest.fixture(scope="session")
def runs(work) -> RunFarm:
    """Each distinct job fitted once per session; every test that reads it gets the same run folder."""
    return RunFarm(work / "farm")


@pytest.fixture(scope="session")
def mlflow_server(work):
    """A real `mlflow server` on loopback for the session (SQLite store, artifacts served from a folder),
    started by the first test that needs it; its tracking URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    from tests._specs import free_port

    root = work / "mlflow"
    root.mkdir()
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "art")]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}") from None
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def method_runs(work, tiny_model, tiny_bert, cache_dir, runs) -> dict[str, Path]:
    """A trained run of every method that is served as a scorer, LoRA and full (in this process, 2 steps
    each): what serving must serve as the run's own model (tests/test_serve_by_method.py in process,
    tests/test_serve.py over HTTP)."""
    from tests._methods_tiny import pairs_task, sign_task
    from tests._preference import preference_task
    from tests._specs import method_spec

    signs, prefs, pairs = sign_task(work / "sbm-signs"), preference_task(work / "sbm-prefs"), pairs_task(work / "sbm-pairs")
    bert_lora = {"kind": "lora", "r": 4, "target_modules": ["query", "value"]}
    llama_lora = {"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    full = {"kind": "full"}
    jobs = {
        "classify-lora": method_spec("classify", tiny_bert, signs[0], signs[1], None, bert_lora, train__max_steps=2),
        "classify-full": method_spec("classify", tiny_bert, signs[0], signs[1], None, full, train__max_steps=2),
        # a reward adapter is served merged (check_job says so)
        "reward-lora": method_spec("reward", tiny_model, prefs[0], prefs[1], None, llama_lora, train__max_steps=2,
                                   output__merge=True),
        "reward-full": method_spec("reward", tiny_model, prefs[0], prefs[1], None, full, train__max_steps=2),
        "contrastive-full": method_spec("contrastive", tiny_bert, pairs[0], pairs[1], None, full, train__max_steps=2),
        "contrastive-lora": method_spec("contrastive", tiny_bert, pairs[0], pairs[1], None, bert_lora, train__max_steps=2),
        # no held-out split: its topic terms need words (the sign task has none), and serving reads only the model
        "cluster-full": method_spec("cluster", tiny_bert, signs[0], None, None, full, train__max_steps=2),
    }
    out = {}
    for name, d in jobs.items():
        d["data"]["cache_dir"] = str(cache_dir)
        out[name] = runs.get(d)[1]
    return out


@pytest.fixture(scope="session")
def ray_local(s3):  # noqa: F811 - s3 first: its endpoint and credentials are in the environment the workers inherit
    """One local Ray cluster on loopback for the session (4 logical CPUs on 2 cores: 2 train workers +
    data tasks), started by the first test that needs it. The dashboard is on: Tune needs it to free a
    finished trial's placement group. The own-cluster modules, ordered last, shut it down."""
    import ray

    if not ray.is_initialized():
        from ftray.train.launch import EMBEDDED_RAY_ENV, worker_env

        # The settings `ftray train` gives an embedded Ray (ftray/train/launch.py `EMBEDDED_RAY_ENV`), set as
        # `ensure_ray` sets them, before `ray.init`: Ray's processes (a Tune trial's driver among them) inherit them,
        # and Ray Train passes them from this process to its controller. The 0.25 s poll is ~4 s less per fit here;
        # no preemption watcher, one actor less to start per fit.
        os.environ.update(EMBEDDED_RAY_ENV)
        env, _ = worker_env(os.environ)  # as `ensure_ray`: the endpoint, not the keys (the workers inherit those)
        ray.init(num_cpus=4, include_dashboard=True, runtime_env={"env_vars": env} if env else None, configure_logging=False)
    return ray


@pytest.fixture
def ray_down():
    """No Ray in this process, so a test can assert that a refused job never started one (those tests
    run before the session's Ray starts), or start a cluster of its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return ray
