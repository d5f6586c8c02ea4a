"""Serving through a storage outage (issue 16, item 6), on the generation engine in this process: adapters
served from a `moto_server` of the test's own, which is then killed (a real refused connection).

The replica keeps answering the adapters it has loaded and the base model; an adapter it has not loaded
answers 503 `storage_unavailable` for its own requests only; a half-copied adapter folder (no run.json) is
refused for that adapter only. No Ray: the engine is what a Serve replica runs.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from tests._s3 import _upload, boto_client, start_moto
from tests._serve_models import make_adapter_run, peft_greedy


def _ids(base: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A moto_server for this test alone (it gets killed); storage points at it until the test ends."""
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// paths")
    from ftray import storage

    proc, url = start_moto(tmp_path / "moto.log")
    monkeypatch.setitem(storage._options, "endpoint_url", url)
    monkeypatch.setitem(storage._options, "region", "us-east-1")
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    boto_client(url).create_bucket(Bucket="outage")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_storage_outage_keeps_loaded_adapters_and_base_answering(tiny_model, tmp_path, own_s3):
    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    proc, url = own_s3
    client = boto_client(url)
    for name, seed in (("a", 31), ("b", 32)):
        _upload(client, make_adapter_run(tiny_model, tmp_path / "runs" / name, seed=seed), f"s3://outage/reg/{name}")
    local_reg = tmp_path / "local-reg"
    half = make_adapter_run(tiny_model, tmp_path / "runs" / "half", seed=33)
    shutil.copytree(half / "adapter", local_reg / "half" / "adapter")  # copied without its run.json

    engine = LoraEngine(GenerationModel(name="tiny", base=str(tiny_model), registry=["s3://outage/reg", str(local_reg)],
                                        reload_check_s=0))  # fmt: skip
    ids = _ids(tiny_model, "12+7=")

    def ask(*adapters):
        return engine.generate([{"adapter": a, "input_ids": ids, "max_tokens": 8, "temperature": 0} for a in adapters])

    base, a = ask(None, "a")
    assert a["token_ids"] == peft_greedy(tiny_model, tmp_path / "runs" / "a" / "adapter", ids, 8) != base["token_ids"], (base, a)

    # A half-copied folder fails its own request; the rest of the batch is answered as before.
    out = ask(None, "a", "half")
    assert out[2]["error"]["status"] == 409 and out[2]["error"]["code"] == "adapter_not_ready", out[2]
    assert [o["token_ids"] for o in out[:2]] == [base["token_ids"], a["token_ids"]]

    # "a" trained again and published over its S3 folder (beside the old version, then switched): the
    # replica notices and answers with the new weights.
    from ftray import storage

    again = make_adapter_run(tiny_model, tmp_path / "runs" / "a-again", seed=34)
    storage.publish_dir(again / "adapter", "s3://outage/reg/a/adapter")
    a = ask("a")[0]
    assert a["token_ids"] == peft_greedy(tiny_model, again / "adapter", ids, 8) != base["token_ids"], a

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    # S3 down: the reload check of "a" fails (it keeps its loaded version), "b" was never loaded.
    for _ in range(2):  # the second batch finds the store marked down and does not wait on it again
        out = ask(None, "a", "b")
        assert [o.get("token_ids") for o in out[:2]] == [base["token_ids"], a["token_ids"]], out
        err = out[2]["error"]
        assert err["status"] == 503 and err["code"] == "storage_unavailable" and err["type"] == "server_error", err
        assert "EndpointConnectionError" in err["message"] or "onnect" in err["message"], err
        assert engine.registry._down_until > time.monotonic()
    assert set(engine.registry.names()) >= {"a"} and list(engine.loaded) == ["a"]
