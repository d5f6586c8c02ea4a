"""A real S3 endpoint on loopback (`moto_server`) for the tests: the `s3` fixture and its bucket, and
`s3_inputs` (the tiny model and the arithmetic data uploaded there with boto3)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests._specs import BIN, free_port

BUCKET = "bucket"
AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _moto_command(port: int) -> list[str]:
    exe = BIN / "moto_server"
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", "127.0.0.1", "-p", str(port)]
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.skip("moto[server] is not installed (no `moto_server` script, no moto.server module)")
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"moto_server did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """A `moto_server` on a free loopback port, answering: (its process, its URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            _moto_command(port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        _wait_http(url + "/", proc, log)
    except BaseException:
        proc.kill()
        raise
    return proc, url


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket `bucket`; AWS_* set in os.environ for the session (the
    session's Ray is started with them: `ray_local` asks for this fixture first)."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// paths")
    boto3 = pytest.importorskip("boto3", reason="boto3 is needed to create the bucket")
    from ftray import storage

    proc, url = start_moto(tmp_path_factory.mktemp("moto") / "moto_server.log")
    saved_env = {k: os.environ.get(k) for k in AWS_ENV}
    saved_opts = dict(storage._options)
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        # An endpoint configured by an earlier test in this process would win over the env var.
        storage._options.update(endpoint_url=url, region="us-east-1")
        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._options.clear()
        storage._options.update(saved_opts)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def boto_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def _upload(client, local: Path, uri: str) -> None:
    """Upload a file or a folder with boto3 (independent of the code under test)."""
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    if local.is_file():
        client.upload_file(str(local), bucket, key)
        return
    for f in sorted(local.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{key.rstrip('/')}/{f.relative_to(local).as_posix()}")


def _remote_cache_dir(uri: str) -> Path:
    """Where storage.cached_copy keeps a local copy of `uri` (same key as ftray.storage)."""
    return Path(os.path.expanduser("~/.cache/ftray/remote")) / hashlib.sha256(uri.encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def s3_inputs(s3, arith, tiny_model):
    """The arithmetic JSONL and the tiny model uploaded under a fresh prefix (fresh: ftray keeps local
    copies of remote models keyed by their path, so a reused path would read an older upload)."""
    prefix = f"s3://{BUCKET}/e2e-{uuid.uuid4().hex[:8]}"
    client = boto_client(s3)
    d = {
        "prefix": prefix,
        "model": f"{prefix}/models/tiny-nano",
        "train": f"{prefix}/data/arith_train.jsonl",
        "eval": f"{prefix}/data/arith_test.jsonl",
    }
    _upload(client, tiny_model, d["model"])
    _upload(client, arith[0], d["train"])
    _upload(client, arith[1], d["eval"])
    yield d
    shutil.rmtree(_remote_cache_dir(d["model"]), ignore_errors=True)
