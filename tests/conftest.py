"""Shared fixtures: tiny models built from a config, the arithmetic task, a local Ray, the shared data."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_shared(*parts: str) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs the shared datasets: {p} is absent")
    return p


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
def cache_dir(work) -> Path:
    """One data cache for the whole session: jobs over the same data and tokenizer prepare once."""
    return work / "cache"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster on loopback (4 logical CPUs on 2 cores: 2 train workers + data tasks).

    Module-scoped and left running for the next module; a module that needs its own cluster (S3
    endpoint in the environment, a `ray start` head) shuts it down, and the next user starts it again."""
    import ray

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}
        ray.init(num_cpus=4, include_dashboard=True, runtime_env={"env_vars": env} if env else None, configure_logging=False)
    return ray


@pytest.fixture
def ray_down():
    """No Ray in this process, so a test can assert that a refused job never started one.

    Shuts down the cluster an earlier module left running (the next `ray_local` user starts it again)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return ray


def job_dict(model: Path, train: Path, test: Path | None, out: Path, cache: Path, **over) -> dict:
    """A small SFT job spec as a dict; `over` replaces sections by dotted keys (e.g. train__max_steps=4)."""
    d = {
        "model": {"path": str(model)},
        "data": {
            "train": str(train),
            "eval": str(test) if test else None,
            "format": "prompt_completion",
            "max_length": 64,
            "cache_dir": str(cache),
        },
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 1e-3, "max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "output": {"dir": str(out)},
    }
    for k, v in over.items():
        sec, key = k.split("__", 1)
        d.setdefault(sec, {})[key] = v
    return d
