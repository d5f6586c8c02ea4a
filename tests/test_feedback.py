"""Human feedback: validation naming the field, no torn or lost lines under concurrent appends (threads and
processes), ratings paired into preference rows, one object per row in a folder read back as one data
file, and end to end: serve -> chat completions -> concurrent POST /v1/feedback -> a `reward` job trains
on the file the server wrote."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ftray.data.rows import DataError, read_checked
from ftray.serve.feedback import FeedbackError, FeedbackStore, append_line
from tests._specs import free_port


def _store(path: Path) -> FeedbackStore:
    s = FeedbackStore(str(path), remember=100)
    history = [{"role": "system", "content": "be brief"}]
    s.remember_completion("chat-1", "tiny", [*history, {"role": "user", "content": "2+2="}], None, ["4", "5"])
    s.remember_completion("chat-2", "tiny", [*history, {"role": "user", "content": "2+2="}], None, ["four"])
    s.remember_completion("chat-3", "tiny", [{"role": "user", "content": "3+3="}], None, ["6"])
    s.remember_completion("cmpl-1", "tiny", None, "2+2=", ["4"])
    return s


def test_pair_feedback_writes_a_preference_row(tmp_path):
    s = _store(tmp_path / "fb.jsonl")
    assert s.handle({"chosen": "chat-1", "rejected": "chat-1:1"}) == {"object": "feedback", "accepted": True, "rows_written": 1}
    (row,) = read_checked(str(tmp_path / "fb.jsonl"), "preference").rows
    assert row == {"prompt": "2+2=", "chosen": "4", "rejected": "5", "history": [{"role": "system", "content": "be brief"}]}


@pytest.mark.parametrize(
    "body,field,message",
    [
        ({"chosen": "chat-1"}, "rejected", "`rejected` is required with `chosen`"),
        ({"chosen": "chat-1", "rejected": "nope"}, "rejected", "`rejected`: no recent completion `nope`"),
        ({"chosen": "chat-1", "rejected": "chat-3"}, "rejected", "answers a different prompt"),
        ({"chosen": "chat-1", "rejected": "cmpl-1"}, "rejected", "answers a different prompt"),  # chat vs plain prompt
        ({"chosen": "chat-1", "rejected": "chat-1:0"}, "rejected", "same text as `chosen`"),
        ({"chosen": "chat-1", "rejected": "chat-1"}, "rejected", "same completion"),
        ({"chosen": 3, "rejected": "chat-1"}, "chosen", "`chosen` must be a completion id string"),
        ({"chosen": "chat-1", "rejected": "chat-2", "rating": 1}, "rating", "not both"),
        ({"id": "chat-1"}, "rating", "`rating` is required"),
        ({"id": "chat-1", "rating": "good"}, "rating", "`rating` must be a finite number"),
        ({"id": "chat-1", "rating": True}, "rating", "`rating` must be a finite number"),
        ({"rating": 1}, "id", "`id` is required"),
        ({"id": "gone", "rating": 1}, "id", "`id`: no recent completion `gone`"),
    ],
)
def test_bad_feedback_names_the_field(body, field, message, tmp_path):
    s = _store(tmp_path / "fb.jsonl")
    with pytest.raises(FeedbackError, match=message) as e:
        s.handle(body)
    assert e.value.param == field
    assert not (tmp_path / "fb.jsonl").exists()


def test_ratings_pair_up_by_prompt(tmp_path):
    s = _store(tmp_path / "fb.jsonl")
    assert s.handle({"id": "chat-1", "rating": 1})["rows_written"] == 0  # nothing to compare with yet
    assert s.handle({"id": "chat-3", "rating": 5})["rows_written"] == 0  # another prompt
    assert s.handle({"id": "chat-1:1", "rating": 1})["rows_written"] == 0  # a tie teaches nothing
    assert s.handle({"id": "chat-2", "rating": 3})["rows_written"] == 2  # beats both earlier answers
    rows = read_checked(str(tmp_path / "fb.jsonl"), "preference").rows
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("four", "4"), ("four", "5")]


def test_remembers_a_bounded_number(tmp_path):
    s = FeedbackStore(str(tmp_path / "fb.jsonl"), remember=4)
    for i in range(10):
        s.remember_completion(f"c{i}", "tiny", None, "p", ["a", "b"])
    assert len(s.recent) <= 4 and "c9:1" in s.recent and "c0" not in s.recent


def _append_many(args):
    path, worker, n = args
    for i in range(n):
        append_line(path, json.dumps({"worker": worker, "i": i, "pad": "x" * (1000 + 37 * i)}))


def test_concurrent_appends_never_tear_or_lose_lines(tmp_path):
    path = str(tmp_path / "fb.jsonl")
    with ThreadPoolExecutor(8) as pool:  # threads of one replica
        list(pool.map(_append_many, [(path, w, 25) for w in range(8)]))
    with multiprocessing.get_context("spawn").Pool(3) as pool:  # several replicas on one host
        pool.map(_append_many, [(path, 100 + w, 25) for w in range(3)])
    lines = Path(path).read_text().splitlines()
    rows = [json.loads(x) for x in lines]  # every line is whole JSON
    assert len(rows) == 11 * 25
    assert {(r["worker"], r["i"]) for r in rows} == {(w, i) for w in [*range(8), 100, 101, 102] for i in range(25)}


def test_folder_mode_one_object_per_row_reads_as_one_file(tmp_path):
    folder = tmp_path / "feedback"
    s = _store(folder)
    s.handle({"chosen": "chat-1", "rejected": "chat-1:1"})
    s.handle({"chosen": "chat-2", "rejected": "chat-1"})
    assert len(list(folder.glob("*.jsonl"))) == 2
    rows = read_checked(str(folder), "preference").rows
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == [("4", "5"), ("four", "4")]
    (folder / "zz-bad.jsonl").write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"feedback/zz-bad.jsonl:1: missing `rejected`"):
        read_checked(str(folder), "preference")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a data folder without .jsonl files"):
        read_checked(str(tmp_path / "empty"), "preference")


# ------------------------------------------------------------------------------------------ Ray


@pytest.mark.integration
def test_serve_feedback_then_train_a_reward_model(tiny_model, cache_dir, tmp_path, ray_local):
    import asyncio

    import httpx
    from ray import serve

    from ftray.config import resolve_paths, spec_from_dict
    from ftray.serve import build_app

    fb = tmp_path / "feedback.jsonl"
    cfg = {
        "generation": [{"name": "tiny", "base": str(tiny_model), "deployment": {"num_cpus": 0.5, "max_batch_size": 8}}],
        "limits": {"default_max_tokens": 6},
        "auth": {"api_keys_env": None, "allow_no_keys": True},  # loopback clients only
        "feedback": {"path": str(fb), "remember": 1000},
        "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 256, "max_queued_requests": 256, "max_batch_size": 1},
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="fb", route_prefix="/")
        url = f"http://127.0.0.1:{port}"

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                answers = await asyncio.gather(*[
                    c.post("/v1/chat/completions", json={
                        "model": "tiny", "messages": [{"role": "user", "content": f"{a}+{a}="}],
                        "n": 2, "temperature": 1.0, "seed": a,
                    })
                    for a in range(24)
                ])
                ids = []
                for r in answers:
                    body = r.json()
                    texts = [ch["message"]["content"] for ch in body["choices"]]
                    if texts[0].strip() != texts[1].strip():
                        ids.append(body["id"])
                bad = await c.post("/v1/feedback", json={"chosen": ids[0], "rejected": "chatcmpl-nope"})
                posts = await asyncio.gather(*[c.post("/v1/feedback", json={"chosen": i, "rejected": f"{i}:1"}) for i in ids])
                return ids, bad, posts

        ids, bad, posts = asyncio.run(go())
    finally:
        serve.shutdown()
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rejected", bad.text
    assert [p.status_code for p in posts] == [200] * len(ids) and len(ids) >= 16, [p.text for p in posts]
    lines = fb.read_text().splitlines()
    assert len(lines) == len(ids) and {json.loads(x)["completions"][0] for x in lines} == set(ids)

    d = {
        "model": {"path": str(tiny_model)},
        "data": {"train": str(fb), "eval": str(fb), "format": "preference", "max_length": 48, "cache_dir": str(cache_dir)},
        "method": {"kind": "reward"},
        "adapter": {"kind": "full"},
        "train": {"lr": 3e-3, "max_steps": 2, "global_batch_size": 8, "micro_batch_size": 4},
        "output": {"dir": str(tmp_path / "rm")},
    }
    from ftray.train.local import run_local

    record = run_local(resolve_paths(spec_from_dict(d)))  # the rows are the point, not Ray: in process
    assert record["data"]["train"]["rows"] == len(ids) and (tmp_path / "rm" / "model" / "model.safetensors").exists()
    assert record["eval"]["after"]["eval_loss"] != record["eval"]["before"]["eval_loss"]
