"""Serving under hostile input and faults, without Ray: API keys required unless the config says otherwise
(never beyond loopback), bounded memory (remembered answers, ratings, unknown adapter names, prompt lists),
feedback on a full disk (no half line, nothing lost, a 503), and OpenAI-shaped 500 and 503 bodies.

Faults are real: the disk fills in a real file (an io.FileIO that takes N bytes, then ENOSPC; and the
kernel's RLIMIT_FSIZE in a subprocess); requests are real ASGI requests."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from starlette.requests import Request

from ftray.serve.api import APIError, Ingress
from ftray.serve.auth import AuthConfigError, require_keys
from ftray.serve.config import Auth, GenerationModel, Limits, ServeConfig
from ftray.serve.feedback import FeedbackStorageError, FeedbackStore
from tests._specs import ROOT

KEY = "sk-unit"


# ------------------------------------------------------------------------------------------ API keys
def test_keys_required_unless_explicitly_allowed_and_always_beyond_loopback(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("FTRAY_API_KEYS", raising=False)
    with pytest.raises(AuthConfigError, match=r"no API key is configured: set \$FTRAY_API_KEYS or `auth.api_keys_file`, or `auth.allow_no_keys: true`"):
        require_keys(Auth(), "127.0.0.1")
    with pytest.raises(AuthConfigError, match=r"^http_options.host 0.0.0.0 listens beyond loopback and no API key"):
        require_keys(Auth(allow_no_keys=True), "0.0.0.0")  # the opt-out never covers a public bind
    with pytest.raises(AuthConfigError, match=r"^--host 10.1.2.3 listens beyond loopback"):
        require_keys(Auth(api_keys_env=None, allow_no_keys=True), "10.1.2.3", "--host")
    with pytest.raises(AuthConfigError, match=r"^auth.api_keys_file: .*nope.txt: No such file"):
        require_keys(Auth(api_keys_file=str(tmp_path / "nope.txt")), "127.0.0.1")
    with caplog.at_level("WARNING", logger="ftray.serve"):
        assert require_keys(Auth(allow_no_keys=True), "127.0.0.1") == set()
        assert require_keys(Auth(allow_no_keys=True), None) == set()  # bind unknown: the replica's own check
    assert "every client that reaches the port is let in" in caplog.text
    monkeypatch.setenv("FTRAY_API_KEYS", f" {KEY}, k2 ,")
    assert require_keys(Auth(), "0.0.0.0") == {KEY, "k2"}
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nk3\n\n")
    assert require_keys(Auth(api_keys_env=None, api_keys_file=str(keys)), "0.0.0.0") == {"k3"}


def test_build_app_refuses_a_config_without_keys(monkeypatch):
    from ftray.serve.app import _ingress_options, build_app

    monkeypatch.delenv("FTRAY_API_KEYS", raising=False)
    cfg = {"generation": [{"name": "tiny", "base": "unused"}]}
    with pytest.raises(AuthConfigError, match="no API key is configured"):
        build_app(cfg)
    build_app({**cfg, "auth": {"allow_no_keys": True}})  # builds the graph only: no Ray, nothing loaded
    monkeypatch.setenv("FTRAY_API_KEYS", KEY)
    build_app(cfg)
    # The ingress queues and refuses by itself (an OpenAI-shaped 503): Serve lets that many in, and more.
    assert _ingress_options(ServeConfig.model_validate(cfg).ingress)["max_ongoing_requests"] == 512 + 512 + 32


@pytest.mark.parametrize("rel", ["deploy/adapters.yaml", "deploy/reward.yaml"])
def test_shipped_serve_configs_need_keys(rel, monkeypatch):
    doc = yaml.safe_load((ROOT / rel).read_text())
    cfg = ServeConfig.model_validate(doc["applications"][0]["args"])
    host = doc["http_options"]["host"]
    monkeypatch.delenv("FTRAY_API_KEYS", raising=False)
    with pytest.raises(AuthConfigError, match=r"\$FTRAY_API_KEYS"):
        require_keys(cfg.auth, host)
    monkeypatch.setenv("FTRAY_API_KEYS", KEY)
    assert require_keys(cfg.auth, host) == {KEY}
    assert require_keys(cfg.auth, "0.0.0.0") == {KEY}


def test_the_served_fixture_config_is_accepted(tmp_path, monkeypatch):
    from tests._serve_models import serve_config

    monkeypatch.delenv("FTRAY_API_KEYS", raising=False)
    keys = tmp_path / "api_keys.txt"
    keys.write_text(f"# test keys\n{KEY}\n")
    cfg = ServeConfig.model_validate(serve_config(tmp_path / "base", tmp_path / "runs", keys))
    assert require_keys(cfg.auth, "127.0.0.1") == {KEY}


# ------------------------------------------------------------------------------------------ bounded memory
def test_remembered_answers_are_bounded_in_bytes_and_ratings_pruned(tmp_path):
    s = FeedbackStore(str(tmp_path / "fb.jsonl"), remember=1000, remember_bytes=200_000)
    for i in range(100):  # 100 x 2 answers of 50 kB: 10 MB if kept
        s.remember_completion(f"c{i}", "tiny", None, f"p{i}", ["a" * 50_000, "b" * 50_000])
    assert s._bytes == sum(s._cost.values()) <= 200_000
    assert "c99:1" in s.recent and "c0:0" not in s.recent and len(s.recent) <= 5

    s = FeedbackStore(str(tmp_path / "fb.jsonl"), remember=20)
    for i in range(10):  # a rating per prompt: each opens an entry in `ratings`
        s.remember_completion(f"r{i}", "tiny", None, f"prompt {i}", ["x"])
        s.handle({"id": f"r{i}", "rating": 1})
    assert len(s.ratings) == 10
    for i in range(100):
        s.remember_completion(f"n{i}", "tiny", None, "other", ["y"])
    assert s.ratings == {}  # the rated answers were forgotten, and their ratings with them


def test_unknown_adapter_names_are_bounded(tmp_path):
    from ftray.serve.registry import AdapterError, AdapterRegistry

    (tmp_path / "reg").mkdir()
    model = GenerationModel(name="tiny", base=str(tmp_path), registry=[str(tmp_path / "reg")], max_unknown_names=50)
    r = AdapterRegistry(model, str(tmp_path), miss_ttl_s=60)
    for i in range(300):
        with pytest.raises(AdapterError):
            r.lookup(f"nope-{i}")
    assert len(r._misses) == 50 and "nope-299" in r._misses and "nope-0" not in r._misses
    r = AdapterRegistry(GenerationModel(name="tiny", base=str(tmp_path), registry=[str(tmp_path / "reg")]), str(tmp_path), miss_ttl_s=0)
    for i in range(20):
        with pytest.raises(AdapterError):
            r.lookup(f"nope-{i}")
    assert len(r._misses) <= 1  # expired entries go as new ones come


def _request(path: str, body: dict, client: str = "127.0.0.1") -> Request:
    data, sent = json.dumps(body).encode(), False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode()),
               (b"content-length", str(len(data)).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b"", "client": (client, 5000)}
    return Request(scope, receive)


def _ingress(**kw) -> SimpleNamespace:
    """The ingress' request plumbing (auth, body limits) on its own: what runs before any model is called."""
    cls = Ingress.func_or_class
    me = SimpleNamespace(keys={KEY}, **kw)
    me._auth = lambda r: cls._auth(me, r)
    me._body = lambda r, m: cls._body(me, r, m)
    me._retry = lambda: cls._retry(me)
    me._call = lambda resp, deadline, cancel=None: cls._call(me, resp, deadline, cancel)
    me._deadline = lambda: cls._deadline(me)
    return me


def _error(e: APIError) -> tuple[int, dict, dict]:
    r = e.response()
    return r.status_code, json.loads(r.body)["error"], dict(r.headers)


def test_completions_prompt_list_is_capped():
    me = _ingress(limits=Limits(max_prompts=3))
    with pytest.raises(APIError) as e:  # refused before tokenizing or routing: `me` has no model at all
        asyncio.run(Ingress.func_or_class.completions(me, _request("/v1/completions", {"model": "tiny", "prompt": ["1+1="] * 4})))
    status, err, _ = _error(e.value)
    assert status == 400 and err["param"] == "prompt" and err["code"] == "too_many_prompts"
    assert err["type"] == "invalid_request_error" and "4 entries" in err["message"] and "limit of 3" in err["message"]


# ------------------------------------------------------------------------------------------ fields refused, never ignored
_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name", "unsupported_parameter"),
    ({"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}}, "stream_options.include_obfuscation",
     "unsupported_parameter"),
    ({"store": True}, "store", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stop": ""}, "stop", "invalid_value"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "invalid_value"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5", "invalid_value"),
])
def test_fields_not_implemented_are_refused_by_name(extra, param, code):
    from ftray.serve.api import ChatRequest, CompletionRequest

    me = _ingress(limits=Limits())
    with pytest.raises(APIError) as e:
        asyncio.run(me._body(_request("/v1/chat/completions", {**_CHAT, **extra}), ChatRequest))
    status, err, _ = _error(e.value)
    assert status == 400 and err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error", err
    assert param.split(".")[0] in err["message"]
    with pytest.raises(APIError) as e:  # completions: logprobs is a count up to 5, and `echo` is not implemented
        asyncio.run(me._body(_request("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 6}), CompletionRequest))
    assert e.value.param == "logprobs"
    with pytest.raises(APIError) as e:
        asyncio.run(me._body(_request("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}), CompletionRequest))
    assert e.value.param == "echo" and e.value.code == "unsupported_parameter"
    # accepted and unused, as they change nothing in an answer
    ok = asyncio.run(me._body(_request("/v1/chat/completions", {**_CHAT, "user": "u-1", "metadata": {"k": "v"}, "store": False}), ChatRequest))
    assert ok.user == "u-1"


# ------------------------------------------------------------------------------------------ a full disk
class _Disk:
    """Opens the feedback file for appending as a real file that takes `room` more bytes, then ENOSPC."""

    def __init__(self):
        self.room: int | None = None  # None: no limit

    def __call__(self, path: str) -> io.FileIO:
        disk = self

        class Full(io.FileIO):
            def write(self, b):
                if disk.room is None:
                    return super().write(b)
                if disk.room <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                n = super().write(bytes(b)[: disk.room])
                disk.room -= n
                return n

        return Full(path, "a")


def _store(path: Path, disk: _Disk) -> FeedbackStore:
    s = FeedbackStore(str(path), remember=100, open_file=disk)
    s.remember_completion("c1", "tiny", [{"role": "user", "content": "2+2="}], None, ["4", "5", "four"])
    return s


def test_full_disk_leaves_no_partial_line_and_loses_nothing(tmp_path):
    path, disk = tmp_path / "fb.jsonl", _Disk()
    s = _store(path, disk)
    assert s.handle({"chosen": "c1:0", "rejected": "c1:1"})["rows_written"] == 1
    assert s.handle({"id": "c1:1", "rating": 1})["rows_written"] == 0
    before = path.read_bytes()
    disk.room = 40  # the next append gets 40 bytes in, then the disk is full
    with pytest.raises(FeedbackStorageError, match=r"No space left on device.*nothing of this feedback was stored"):
        s.handle({"id": "c1:2", "rating": 5})  # beats c1:1: one row
    assert path.read_bytes() == before  # cut back: no half line, the earlier row intact
    disk.room = 0
    with pytest.raises(FeedbackStorageError):
        s.handle({"chosen": "c1:2", "rejected": "c1:0"})
    assert path.read_bytes() == before
    disk.room = None  # space again: the retried rating pairs as if the failed one never happened
    assert s.handle({"id": "c1:2", "rating": 5})["rows_written"] == 1
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("4", "5"), ("four", "5")]


_FSIZE_CHILD = """
import json, os, resource, signal, sys
from ftray.serve.feedback import FeedbackStorageError, FeedbackStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: a short write, then EFBIG (not death by signal)
where = sys.argv[1]
s = FeedbackStore(where, remember=100)
s.remember_completion("c1", "tiny", [{"role": "user", "content": "2+2="}], None, ["4", "5", "four"])
s.handle({"chosen": "c1:0", "rejected": "c1:1"})  # stored before the disk fills
s.handle({"id": "c1:1", "rating": 1})  # nothing to pair with yet: no row
room = os.path.getsize(where) + 30 if where.endswith(".jsonl") else 30  # every row is longer than 30 bytes
resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
try:
    s.handle({"id": "c1:2", "rating": 5})  # beats c1:1: one row, cut short by the kernel
    sys.exit("the write was not refused")
except FeedbackStorageError as e:
    print("refused:", e, flush=True)
sys.stdin.read()  # the parent looks at the disk now
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("retried:", s.handle({"id": "c1:2", "rating": 5})["rows_written"], flush=True)
"""


def _on_disk(where: Path) -> dict[str, bytes]:
    files = sorted(where.iterdir()) if where.is_dir() else [where]
    return {f.name: f.read_bytes() for f in files}


@pytest.mark.parametrize("mode", ["fb.jsonl", "folder"])
def test_kernel_file_size_limit_leaves_no_partial_row_and_loses_nothing(tmp_path, mode):
    """A real short write (RLIMIT_FSIZE, in a child process): refused with nothing of it on disk, the row
    stored before intact, and the same feedback stored once there is room again."""
    where = tmp_path / mode
    child = subprocess.Popen([sys.executable, "-c", _FSIZE_CHILD, str(where)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = child.stdout.readline()
        assert line.startswith("refused:") and "File too large" in line and "nothing of this feedback was stored" in line, (
            line + child.stderr.read() if child.poll() is not None else line
        )
        full = _on_disk(where)
        out, err = child.communicate("", timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0 and out.strip() == "retried: 1", err
    rows = [json.loads(x) for body in full.values() for x in body.decode().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("4", "5")]  # no half row, the earlier one intact
    assert all(b.endswith(b"\n") for b in full.values()) and not [n for n in full if n.endswith(".tmp")]
    rows = [json.loads(x) for body in _on_disk(where).values() for x in body.decode().splitlines()]
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == [("4", "5"), ("four", "5")]


def test_feedback_storage_error_answers_503(tmp_path):
    disk = _Disk()
    me = _ingress(limits=Limits(retry_after_s=3), feedback=_store(tmp_path / "fb.jsonl", disk))
    disk.room = 0
    with pytest.raises(APIError) as e:
        asyncio.run(Ingress.func_or_class.feedback_(me, _request("/v1/feedback", {"chosen": "c1:0", "rejected": "c1:1"})))
    status, err, headers = _error(e.value)
    assert status == 503 and headers["retry-after"] == "3" and err["type"] == "server_error"
    assert err["code"] == "feedback_storage_unavailable" and str(tmp_path) not in err["message"]  # no server paths
    assert not (tmp_path / "fb.jsonl").exists() or (tmp_path / "fb.jsonl").read_bytes() == b""


# ------------------------------------------------------------------------------------------ error shapes
class _Upstream:
    """Stands in for a generator replica's token stream (a Serve streaming response): it answers `first`
    (raises it, if an exception), then a token every 10 ms, `tokens` of them (None: forever), then a finish."""

    def __init__(self, first, tokens: int | None = None):
        self.first, self.tokens, self.sent, self.cancelled = first, tokens, 0, False

    async def __anext__(self):
        self.sent += 1
        if self.sent == 1:
            if isinstance(self.first, BaseException):
                raise self.first
            return self.first
        await asyncio.sleep(0.01)
        if self.tokens is not None and self.sent > self.tokens + 2:
            raise StopAsyncIteration
        if self.tokens is not None and self.sent == self.tokens + 2:
            return {"finish_reason": "length"}
        return {"token_ids": [self.sent]}

    def cancel(self):
        self.cancelled = True


def _guarded(ongoing: int, queued: int, upstream: _Upstream | None = None):
    """A FastAPI app behind the ingress' guard and admission; `/stream` is the ingress' own stream (with
    `upstream` for the generator replica), `/wait` waits for the gate, `/boom` fails."""
    from fastapi import FastAPI

    from ftray.serve.api import _Admission, _Guard

    app = FastAPI()
    app.add_middleware(_Guard)
    app.state.admission = _Admission(ongoing, queued, retry_after_s=7)
    gate = asyncio.Event()

    @app.get("/wait")
    async def wait():
        await gate.wait()
        return {"ok": True}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    @app.get("/stream")
    async def stream():
        handle = SimpleNamespace(options=lambda stream: SimpleNamespace(stream=SimpleNamespace(remote=lambda req: upstream)))
        tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(chr(96 + i % 26) for i in ids))
        me = _ingress(limits=Limits(retry_after_s=7), generators={"tiny": handle}, tok={"tiny": tok})
        body = SimpleNamespace(stream_options=None)
        return await Ingress.func_or_class._stream(me, "tiny", {}, body, {}, lambda text, finish, logprobs, first=False: {"text": text or ""})

    return app, gate


def test_unexpected_exception_answers_openai_500():
    from ftray.serve.api import app as ingress_app

    async def go():
        app, _ = _guarded(4, 4)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            r = await c.get("/boom")
        # The real ingress app outside a Serve replica: resolving the route's instance fails, unexpectedly.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(ingress_app), base_url="http://t") as c:
            real = await c.get("/v1/models")
        return r, real

    r, real = asyncio.run(go())
    for resp in (r, real):
        assert resp.status_code == 500, resp.text
        err = resp.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error" and "server log" in err["message"]
    assert "a bug" not in r.text  # the message stays in the log


def test_full_ingress_queue_answers_openai_503_with_retry_after():
    async def go():
        app, gate = _guarded(ongoing=2, queued=1)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            first = [asyncio.create_task(c.get("/wait")) for _ in range(3)]  # 2 run, 1 waits
            await asyncio.sleep(0.05)
            refused = await asyncio.wait_for(c.get("/wait"), 5)  # answered while the others still wait
            other = await c.get("/boom")  # any route is refused while full
            gate.set()
            done = await asyncio.gather(*first)
            after = await c.get("/wait")
        return refused, other, done, after

    refused, other, done, after = asyncio.run(go())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "7"
    err = refused.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "overloaded" and "2 requests in progress" in err["message"]
    assert other.status_code == 503
    assert [r.status_code for r in done] == [200, 200, 200] and after.status_code == 200  # slots freed


def test_stream_is_admitted_or_refused_before_its_200():
    from ray.serve.exceptions import BackPressureError

    full = _Upstream(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    gone = _Upstream({"error": {"message": "The model `tiny:x` does not exist", "code": "model_not_found", "status": 404}})
    taken = _Upstream({"admitted": True}, tokens=3)

    async def go(upstream):
        app, _ = _guarded(4, 4, upstream)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.get("/stream")

    r = asyncio.run(go(full))
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "rate_limit_error"
    r = asyncio.run(go(gone))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = asyncio.run(go(taken))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert [json.loads(x[6:])["choices"][0]["text"] for x in r.text.split("\n\n")[:-2]] == ["", "b", "c", "d", ""]
    assert r.text.endswith("data: [DONE]\n\n") and not taken.cancelled  # finished: nothing to cancel


async def _asgi(app, path: str, spec: str, gone: asyncio.Event, events: list):
    """One request straight through ASGI, from a client that leaves when `gone` is set. Under ASGI spec 2.4
    the server's send fails once the client is gone; before 2.4 the app hears an http.disconnect."""
    asked = False

    async def receive():
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set() and spec == "2.4":
            raise OSError("the client is gone")
        events.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 5000), "server": ("t", 80)}
    await app(scope, receive, send)


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_client_gone_mid_stream_frees_its_slot(spec):
    upstream = _Upstream({"admitted": True})  # tokens forever

    async def go():
        app, gate = _guarded(ongoing=1, queued=0, upstream=upstream)
        gone, events = asyncio.Event(), []

        async def stream():
            await _asgi(app, "/stream", spec, gone, events)
            return upstream.cancelled  # when the response is over, not whenever its generator is collected

        streaming = asyncio.create_task(stream())
        for _ in range(500):  # until the second token's event is out
            if sum(1 for m in events if m["type"] == "http.response.body" and b'"b' in m.get("body", b"")):
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            gate.set()
            held = await c.get("/wait")  # the stream holds the only slot
            gone.set()
            cancelled = await asyncio.wait_for(streaming, 5)
            after = await c.get("/wait")
        return events, held, cancelled, after

    events, held, cancelled, after = asyncio.run(go())
    assert events[0]["type"] == "http.response.start" and events[0]["status"] == 200
    assert held.status_code == 503 and held.json()["error"]["code"] == "overloaded"
    assert cancelled, "the generator replica was not told that its client left"
    assert after.status_code == 200  # the slot was freed
