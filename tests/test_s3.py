"""s3:// paths end to end against a real `moto_server` on loopback.

Unit level: ftray.storage round trips, pyarrow access, publish_dir's `.complete` commit marker.
Refusals: a job whose S3 data is missing fails before Ray. A job whose model, data, cache and output all
live on S3 (run on a 2-node cluster, its adapter downloaded and loaded with peft, then served from S3):
tests/test_cluster_e2e.py `test_two_node_job_all_on_s3_then_serve_deploy`.
"""

from __future__ import annotations

import uuid

import pytest

from tests._s3 import BUCKET, boto_client
from tests._specs import job_dict

pytestmark = pytest.mark.integration

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
    body = boto_client(s3).get_object(Bucket=BUCKET, Key=f.removeprefix(f"s3://{BUCKET}/"))["Body"].read()
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

    def pipe_file(self, path, value, *a, **kw):
        self._log.append(path)
        return self._fs.pipe_file(path, value, *a, **kw)

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

    # Publishing again uploads the new version beside the old one, then switches the marker to it (one PUT,
    # the last write before clean-up); readers see the new files only.
    (src / "a.txt").unlink()
    (src / "c.txt").write_text("C")
    written.clear()
    monkeypatch.setattr(storage, "filesystem", lambda path: (_Recording(real(path)[0], written), real(path)[1]))
    storage.publish_dir(src, dst)
    monkeypatch.setattr(storage, "filesystem", real)
    names = [w.rsplit("/out/", 1)[1] for w in written]
    vid = names[0].split("/")[1]
    assert names == [f".v/{vid}/c.txt", f".v/{vid}/sub/b.bin", f".v/{vid}/.complete", ".complete"], names
    assert storage.current(dst) == f"{dst}/.v/{vid}" and storage.is_complete(dst)
    assert storage.read_text(storage.file_in(dst, "c.txt")) == "C"
    assert not storage.exists(storage.file_in(dst, "a.txt"))
    got = storage.download_dir(dst, tmp_path / "got")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [".complete", "c.txt", "sub/b.bin"]
    # The previous version stays (a reader may be downloading it); the one before it goes.
    assert storage.listdir(dst) == [".complete", ".v", "a.txt", "sub"]
    (src / "c.txt").write_text("C2")
    storage.publish_dir(src, dst)
    assert storage.listdir(dst) == [".complete", ".v"] and len(storage.listdir(f"{dst}/.v")) == 2
    assert storage.read_text(storage.file_in(dst, "c.txt")) == "C2"

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


def test_publish_killed_midway_leaves_the_previous_version_whole(s3, tmp_path):
    """A process SIGKILLed while it publishes a new version over a complete S3 folder: the folder is still
    complete, and reads and downloads give the previous version, file for file; the next publish goes on."""
    import signal
    import subprocess
    import sys
    import time

    from ftray import storage
    from tests._specs import ROOT

    dst = f"s3://{BUCKET}/publish-kill-{uuid.uuid4().hex[:8]}/adapter"
    old = tmp_path / "old"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"old" * 1000)
    storage.publish_dir(old, dst)
    new = tmp_path / "new"
    new.mkdir()
    for i in range(200):  # many objects: the upload takes seconds
        (new / f"part-{i:03d}.bin").write_bytes(bytes([i % 256]) * 20_000)
    code = f"from ftray import storage; storage.publish_dir({str(new)!r}, {dst!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)
    client, (bucket, key) = boto_client(storage._endpoint()), dst.removeprefix("s3://").split("/", 1)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/.v/").get("KeyCount", 0) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the publish finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    uploaded = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/.v/")["KeyCount"]
    assert 3 <= uploaded < 200, uploaded  # killed half way through the new version
    assert storage.is_complete(dst) and storage.current(dst) == dst
    got = storage.download_dir(dst, tmp_path / "got")
    assert sorted(p.name for p in got.iterdir()) == [".complete", "weights.bin"]
    assert (got / "weights.bin").read_bytes() == b"old" * 1000
    # The next publish completes and clears the half-written version away.
    (old / "weights.bin").write_bytes(b"newer")
    storage.publish_dir(old, dst)
    assert storage.read_text(storage.file_in(dst, "weights.bin")) == "newer"
    assert len(storage.listdir(f"{dst}/.v")) == 1


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


def test_live_tensorboard_on_s3_is_copied_in_place(s3, tmp_path):
    """The TensorBoard events of a run on S3, copied at each checkpoint: one folder (no published versions,
    which `tensorboard --logdir` would show as runs of their own) holding every step so far."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ftray import storage
    from ftray.train.live import LiveTensorBoard

    out = f"s3://{BUCKET}/tb-{uuid.uuid4().hex[:8]}/run"
    tb = LiveTensorBoard(out)
    for step in (1, 2, 3):
        tb.add({"step": step, "loss": 1.0 / step}, flush=True)
        tb.publish()
    names = storage.listdir(f"{out}/tb")
    assert len(names) == 1 and names[0].startswith("events.out.tfevents"), names
    tb.close()
    assert storage.is_complete(f"{out}/tb")
    ea = EventAccumulator(str(storage.download_dir(f"{out}/tb", tmp_path / "tb")))
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == [1, 2, 3]
