"""s3:// paths end to end against a real `moto_server` on loopback.

Unit level: ftray.storage round trips, pyarrow access, publish_dir's `.complete` commit marker.
End to end: an SFT job (2 workers, ZeRO-2, LoRA) whose model, data, cache and output all live on S3;
the adapter it writes is downloaded and loaded with peft.

Ray detail: the cluster must see AWS_ENDPOINT_URL, so it is in os.environ before `ray.init`; this file
does not use the session `ray_local` fixture and lets `ftray.train.launch.train` start Ray itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests._s3 import BUCKET
from tests._specs import job_dict

pytestmark = pytest.mark.integration

def _boto(url: str):
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


@pytest.fixture(scope="module")
def s3_inputs(s3, arith, tiny_model):
    """The arithmetic JSONL and the tiny model uploaded under a fresh prefix (fresh: ftray keeps local
    copies of remote models keyed by their path, so a reused path would read an older upload)."""
    prefix = f"s3://{BUCKET}/e2e-{uuid.uuid4().hex[:8]}"
    client = _boto(s3)
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


# --------------------------------------------------------------------------------------------- unit level


def test_storage_round_trip(s3):
    from ftray import storage

    base = f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}"
    f = storage.join(base, "a", "b.txt")
    assert f == f"{base}/a/b.txt"
    assert storage.is_remote(f)
    assert not storage.exists(f)
    assert storage.listdir(base) == []

    storage.write_text_atomic(f, "héllo\n")
    assert storage.exists(f)
    assert storage.read_text(f) == "héllo\n"
    storage.write_text_atomic(storage.join(base, "a", "c.txt"), "2")
    storage.write_text_atomic(storage.join(base, "top.txt"), "3")
    assert storage.listdir(storage.join(base, "a")) == ["b.txt", "c.txt"]
    assert storage.listdir(base) == ["a", "top.txt"]
    assert storage.listdir(storage.join(base, "missing")) == []
    assert storage.isdir(storage.join(base, "a"))
    assert storage.size(f) == len("héllo\n".encode())

    # Overwrite replaces the whole object.
    storage.write_text_atomic(f, "new")
    assert storage.read_text(f) == "new"

    # The object really is on the moto server, under the key the path names.
    body = _boto(s3).get_object(Bucket=BUCKET, Key=f.removeprefix(f"s3://{BUCKET}/"))["Body"].read()
    assert body == b"new"

    # pyarrow (what Ray Train and Ray Data use) sees the same objects.
    fs, p = storage.pyarrow_filesystem(f)
    assert p == f.removeprefix("s3://")
    with fs.open_input_stream(p) as fh:
        assert fh.read() == b"new"

    storage.remove(storage.join(base, "a"))
    assert not storage.exists(f)
    assert storage.listdir(base) == ["top.txt"]


class _Recording:
    """Wraps an fsspec filesystem and records every object written, in order."""

    def __init__(self, fs, log: list[str], fail_on_put: int | None = None):
        self._fs, self._log, self._fail_on_put, self._puts = fs, log, fail_on_put, 0

    def put_file(self, lpath, rpath, *a, **kw):
        self._puts += 1
        if self._fail_on_put is not None and self._puts == self._fail_on_put:
            raise OSError("simulated upload failure")
        self._log.append(rpath)
        return self._fs.put_file(lpath, rpath, *a, **kw)

    def open(self, path, mode="rb", *a, **kw):
        if "w" in mode or "a" in mode:
            self._log.append(path)
        return self._fs.open(path, mode, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_publish_dir_writes_complete_last(s3, tmp_path, monkeypatch):
    from ftray import storage

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    dst = f"s3://{BUCKET}/publish-{uuid.uuid4().hex[:8]}/out"

    written: list[str] = []
    real = storage.filesystem
    monkeypatch.setattr(
        storage, "filesystem", lambda path: (_Recording(real(path)[0], written), real(path)[1])
    )
    storage.publish_dir(src, dst)
    monkeypatch.setattr(storage, "filesystem", real)

    names = [w.rsplit("/out/", 1)[1] for w in written]
    assert names[-1] == ".complete", f"`.complete` must be the last object written, got {names}"
    assert sorted(names[:-1]) == ["a.txt", "sub/b.bin"]
    assert storage.listdir(dst) == [".complete", "a.txt", "sub"]
    assert storage.read_text(storage.join(dst, "a.txt")) == "A"
    with storage.open_file(storage.join(dst, "sub", "b.bin")) as fh:
        assert fh.read() == b"\x00\x01"

    # Publishing again replaces the folder: nothing of the old one is left behind.
    (src / "a.txt").unlink()
    (src / "c.txt").write_text("C")
    storage.publish_dir(src, dst)
    assert storage.listdir(dst) == [".complete", "c.txt", "sub"]

    # An upload that dies half way leaves a folder without `.complete`: incomplete, not committed.
    broken = f"s3://{BUCKET}/publish-{uuid.uuid4().hex[:8]}/out"
    written.clear()
    monkeypatch.setattr(
        storage, "filesystem", lambda path: (_Recording(real(path)[0], written, fail_on_put=2), real(path)[1])
    )
    with pytest.raises(OSError, match="simulated"):
        storage.publish_dir(src, broken)
    monkeypatch.setattr(storage, "filesystem", real)
    assert len(written) == 1  # one file made it
    assert storage.listdir(broken)  # ... so the folder exists
    assert not storage.exists(storage.join(broken, ".complete"))  # ... but is not marked complete


def test_load_spec_from_s3(s3):
    from ftray import storage
    from ftray.config import load_spec

    uri = f"s3://{BUCKET}/specs-{uuid.uuid4().hex[:8]}/job.yaml"
    storage.write_text_atomic(
        uri,
        "model:\n  path: s3://bucket/m\ndata:\n  train: s3://bucket/d/train.jsonl\n  format: prompt_completion\n"
        "train:\n  max_steps: 3\noutput:\n  dir: s3://bucket/runs/x\n",
    )
    spec = load_spec(uri, ["train.max_steps=4", f"storage.endpoint_url={s3}"])
    assert spec.train.max_steps == 4
    assert spec.storage.endpoint_url == s3
    # s3:// paths are left as they are (only local paths are made absolute).
    assert spec.model.path == "s3://bucket/m"
    assert spec.data.train == "s3://bucket/d/train.jsonl"
    assert spec.output.dir == "s3://bucket/runs/x"


@pytest.mark.parametrize("which", ["train", "eval"])
def test_missing_s3_data_fails_before_ray(s3, s3_inputs, monkeypatch, which):
    import ray

    from ftray.config import spec_from_dict
    from ftray.data.rows import DataError
    from ftray.train import launch

    was_up = ray.is_initialized()
    missing = f"s3://{BUCKET}/missing.jsonl"
    paths = {"train": s3_inputs["train"], "eval": s3_inputs["eval"], which: missing}
    d = job_dict(
        s3_inputs["model"],
        paths["train"],
        paths["eval"],
        f"{s3_inputs['prefix']}/runs/never",
        f"{s3_inputs['prefix']}/cache",
        train__max_steps=4,
        storage__endpoint_url=s3,
    )

    def no_ray(*a, **k):
        raise AssertionError("Ray was started before the data were checked")

    monkeypatch.setattr(launch, "ensure_ray", no_ray)
    with pytest.raises(DataError) as err:
        launch.train(spec_from_dict(d))
    assert missing in str(err.value)
    assert "no such data file" in str(err.value)
    assert ray.is_initialized() == was_up
    from ftray import storage

    assert not storage.exists(f"{s3_inputs['prefix']}/runs/never")


# --------------------------------------------------------------------------------------------- end to end


def test_sft_job_all_on_s3(s3, s3_inputs, tiny_model, tmp_path, ray_local):
    from ftray import storage
    from ftray.config import spec_from_dict
    from ftray.train.launch import train

    # The session's Ray was started after AWS_ENDPOINT_URL was in os.environ (`ray_local` asks for `s3`):
    # its workers reach the moto endpoint as a cloud node reaches S3.
    assert os.environ["AWS_ENDPOINT_URL"] == s3
    out = f"{s3_inputs['prefix']}/runs/sft"
    cache = f"{s3_inputs['prefix']}/cache"
    d = job_dict(
        s3_inputs["model"],
        s3_inputs["train"],
        s3_inputs["eval"],
        out,
        cache,
        train__max_steps=4,
        storage__endpoint_url=s3,
    )
    spec = spec_from_dict(d)
    assert all(
        p.startswith("s3://")
        for p in (spec.model.path, spec.data.train, spec.data.eval, spec.output.dir, spec.data.cache_dir)
    )
    record = train(spec)

    assert record["status"] == "completed"
    assert record["train"]["steps"] == 4

    # The run folder on S3.
    names = storage.listdir(out)
    for n in ("run.json", "adapter", "metrics.jsonl", "checkpoints", "tokenizer"):
        assert n in names, f"{out} lacks {n}: {names}"
    run = json.loads(storage.read_text(f"{out}/run.json"))
    assert run["status"] == "completed"
    assert run["spec"]["output"]["dir"] == out
    assert run["base_model"] == s3_inputs["model"]
    adapter = storage.listdir(f"{out}/adapter")
    assert {".complete", "adapter_config.json", "adapter_model.safetensors"} <= set(adapter), adapter
    metrics = [json.loads(x) for x in storage.read_text(f"{out}/metrics.jsonl").splitlines() if x.strip()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == [1, 2, 3, 4]
    assert any(n.startswith("checkpoint_") for n in storage.listdir(f"{out}/checkpoints")), storage.listdir(
        f"{out}/checkpoints"
    )

    # The prepared data went to the S3 cache.
    key = record["data_hash"]
    assert key in storage.listdir(cache)
    assert storage.exists(f"{cache}/{key}/meta.json")

    # Download the adapter and load it on the tiny base.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = storage.download_dir(f"{out}/adapter", tmp_path / "adapter")
    cfg = json.loads((local / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == s3_inputs["model"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(local))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b, "no LoRA weights in the loaded adapter"
    # lora_B starts at zero: non-zero values mean the trained weights were saved (ZeRO-2, rank 0).
    assert any(p.abs().sum() > 0 for p in lora_b.values())
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == base.config.vocab_size
