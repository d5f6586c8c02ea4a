"""Serving: one Serve app (started once for the module) on loopback, driven by the real openai client,
httpx and deployment handles. Run folders are made with peft directly (tests/_serve_models.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

from tests._serve_models import expected_outputs, make_adapter_run, make_scorer_run, peft_greedy, serve_config
from tests._specs import ROOT, free_port

KEY = "sk-test-123"
APP = "ftray"




@pytest.fixture(scope="module")
def served(ray_local, tiny_model, work, method_runs):
    from ray import serve

    from ftray.serve import build_app

    runs = work / "serve-runs"
    for i, name in enumerate(["sft-a", "sft-b"]):
        make_adapter_run(tiny_model, runs / name, seed=10 + i)
    make_adapter_run(tiny_model, runs / "registry" / "sft-c", seed=12)
    keys = work / "api_keys.txt"
    keys.write_text(f"# test keys\n{KEY}\n")
    port = free_port()
    cfg = serve_config(tiny_model, runs, keys)
    # The scorers are trained runs (conftest's `method_runs`), one per endpoint: a LoRA classifier, a full
    # reward model, a LoRA contrastive encoder (the base's own embeddings are "emb"). Every other method x
    # adapter row is served in process by tests/test_serve_by_method.py (a replica each costs ~15 s here).
    cfg["scorers"][1]["path"] = str(method_runs["classify-lora"])
    cfg["scorers"][2]["path"] = str(method_runs["reward-full"])
    cfg["scorers"].append({**cfg["scorers"][0], "name": "emb-lora", "path": str(method_runs["contrastive-lora"])})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=APP, route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "runs": runs, "base": tiny_model, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _httpx():
    """httpx, or httpx2 (the fork that the openai client >= 3 depends on): the same API."""
    try:
        import httpx
    except ImportError:
        import httpx2 as httpx
    return httpx


def _ids(base: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.integration
def test_openai_client_chat_stream_completions_embeddings_models(served, client):
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "tiny:sft-a", "tiny:sft-b", "tiny:sft-c", "emb", "emb-lora", "cls", "rm"} <= ids

    msgs = [{"role": "user", "content": "2+3="}]
    chat = client.chat.completions.create(model="tiny:sft-a", messages=msgs, max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model="tiny:sft-a", messages=msgs, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text  # streamed = whole, greedy
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    comp = client.completions.create(model="tiny:sft-b", prompt="2+3=", max_tokens=6, temperature=0, n=2)
    assert len(comp.choices) == 2 and comp.choices[0].text == comp.choices[1].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny:sft-b", prompt="2+3=", max_tokens=6, temperature=0, stream=True))
    assert streamed == comp.choices[0].text

    emb = client.embeddings.create(model="emb", input=["hello", "2+3=5"])  # the client asks for base64
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
    assert abs(sum(x * x for x in emb.data[0].embedding) - 1) < 1e-4
    flat = client.embeddings.create(model="emb", input="hello", encoding_format="float")
    assert flat.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-6)


@pytest.mark.integration
def test_openai_fields_as_the_openai_client_sends_them(served, client):
    """stop, seed, logprobs / top_logprobs, presence / frequency penalties, stream_options.include_usage,
    models.retrieve: each as OpenAI documents it, streamed and whole alike; a field not implemented is a 400
    naming it (the engine-level checks of each field are in tests/test_serve_sampling.py)."""
    import openai
    from transformers import AutoTokenizer

    m, prompt = "tiny:sft-a", "12+7="
    whole = client.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0, logprobs=2).choices[0]
    # a token that is part of a character is named `bytes:\\xNN` (the random adapter makes such bytes); special
    # tokens are named too, and left out of the text
    special = set(AutoTokenizer.from_pretrained(served["base"]).all_special_tokens)
    raw = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                   for t in whole.logprobs.tokens if t not in special)
    assert raw.decode(errors="replace") == whole.text and whole.logprobs.text_offset[0] == 0
    assert all(2 <= len(t) <= 3 and t[tok] == lp for t, tok, lp in
               zip(whole.logprobs.top_logprobs, whole.logprobs.tokens, whole.logprobs.token_logprobs, strict=True))
    k = next(k for k in range(1, len(whole.text) - 2) if whole.text.find(whole.text[k : k + 2]) == k)
    stop = whole.text[k : k + 2]
    cut = client.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "never"])
    assert cut.choices[0].text == whole.text[:k] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=m, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text[:k]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == cut.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "stop"

    msgs = [{"role": "user", "content": "2+3="}]
    kw = dict(model=m, messages=msgs, max_tokens=10, temperature=1.0, seed=11, logprobs=True, top_logprobs=2,
              presence_penalty=0.5, frequency_penalty=0.5)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    other = client.chat.completions.create(**{**kw, "seed": 12})
    assert a.choices[0].message.content == b.choices[0].message.content != other.choices[0].message.content
    lp = a.choices[0].logprobs.content
    assert len(lp) == a.usage.completion_tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    assert bytes(b for t in lp if t.token not in special for b in t.bytes).decode(errors="replace") == a.choices[0].message.content
    streamed = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == a.choices[0].message.content
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content] == lp

    assert client.models.retrieve(m).model_dump()["parent"] == "tiny" and client.models.retrieve("rm").id == "rm"
    for missing in ("tiny:nope", "nope", "rm:x"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(missing)
    refused = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
               "response_format": {"type": "json_object"}, "extra_body": {"best_of": 2}}
    for name, value in refused.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=m, messages=msgs, max_tokens=2, **{name: value})
        assert e.value.param == ("best_of" if name == "extra_body" else name) and e.value.code == "unsupported_parameter"


@pytest.mark.integration
def test_two_adapters_one_replica_match_peft(served, client):
    import torch
    from peft import PeftModel
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served["base"])
    ids = _ids(served["base"], "12+7=")
    texts = {}
    for name in ("sft-a", "sft-b"):
        got = client.completions.create(model=f"tiny:{name}", prompt="12+7=", max_tokens=10, temperature=0)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served["base"]), served["runs"] / name / "adapter")
        with torch.no_grad():
            ref = peft.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert got.choices[0].text == tok.decode(ref, skip_special_tokens=True), name
        texts[name] = got.choices[0].text
    assert texts["sft-a"] != texts["sft-b"]
    gen = serve.get_deployment_handle("gen-tiny", app_name=APP)
    assert {"sft-a", "sft-b"} <= set(gen.loaded_adapters.remote().result())  # one replica holds both


@pytest.mark.integration
def test_mixed_batch_equals_alone_through_handle(served):
    from ray import serve

    gen = serve.get_deployment_handle("gen-tiny", app_name=APP)
    prompts = ["2+3=", "12+7=", "19+19=", "4+4=", "1+0=", "7+8="]
    reqs = [
        {"adapter": a, "input_ids": _ids(served["base"], p), "max_tokens": 8, "temperature": 0.0}
        for a, p in zip(["sft-a", "sft-b", "sft-c"] * 2, prompts, strict=True)
    ]
    alone = [gen.generate.remote(r).result()["token_ids"] for r in reqs]

    async def together():
        return await asyncio.gather(*[gen.generate.remote(r) for r in reqs])

    mixed = asyncio.run(together())
    assert max(m["batch_size"] for m in mixed) >= 3 and max(m["adapters_in_batch"] for m in mixed) == 3
    assert [m["token_ids"] for m in mixed] == alone
    assert len({tuple(a) for a in alone[:3]}) == 3  # the three adapters answer differently


@pytest.mark.integration
def test_new_registry_adapter_servable_without_restart(served, client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny:sft-new", prompt="1+1=", max_tokens=2)
    make_adapter_run(served["base"], served["runs"] / "registry" / "sft-new", seed=99)
    time.sleep(1.1)  # the registry remembers a miss for 1 s
    out = client.completions.create(model="tiny:sft-new", prompt="1+1=", max_tokens=4, temperature=0)
    assert out.choices[0].text is not None
    assert "tiny:sft-new" in {m.id for m in client.models.list().data}


@pytest.mark.integration
def test_rewards_and_classify_over_http(served):
    httpx = _httpx()

    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(served["url"] + "/v1/classify", headers=h, json={"model": "cls", "input": ["good", "bad"]}, timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()["data"]
    assert len(d) == 2 and d[0]["label"] in ("big", "small") and set(d[0]["scores"]) == {"big", "small"}
    assert sum(d[0]["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    body = {"model": "rm", "input": [{"prompt": "2+3=", "response": "5"}, {"prompt": "2+3=", "response": "6"},
                                     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]}
    r = httpx.post(served["url"] + "/v1/rewards", headers=h, json=body, timeout=60)
    assert r.status_code == 200, r.text
    scores = [x["score"] for x in r.json()["data"]]
    assert len(scores) == 3 and scores[0] != scores[1]

    from ray import serve  # the same scores through a handle, as the RLHF loop calls it

    rm = serve.get_deployment_handle("score-rm", app_name=APP)
    via_handle = rm.score.remote([{"prompt": "2+3=", "response": "5"}]).result()
    assert via_handle[0]["score"] == pytest.approx(scores[0], abs=1e-5)


@pytest.mark.integration
def test_trained_runs_serve_their_own_models_outputs_over_http(served, client, method_runs):
    """Each endpoint over a trained run: /v1/classify (a LoRA classifier: its label names and
    probabilities), /v1/rewards (a full reward model: its scores), /v1/embeddings through the openai client
    (a LoRA contrastive encoder); each equals what the run's own model (loaded as `ftray eval` loads it)
    gives for the same inputs."""
    httpx = _httpx()
    h = {"Authorization": f"Bearer {KEY}"}
    texts = ["big big big", "small", "a b c d e f"]
    pairs = [{"prompt": "2+2=", "response": "4"}, {"prompt": "2+2=", "response": "five"}]
    trained = {str(p) for p in method_runs.values()}
    kinds = set()
    for sc in served["cfg"]["scorers"]:
        if sc["path"] not in trained:
            continue
        name, kind = sc["name"], sc["kind"]
        items = pairs if kind == "reward" else texts
        want = expected_outputs(Path(sc["path"]), kind, items)
        if kind == "embedding":
            got = [e.embedding for e in client.embeddings.create(model=name, input=texts).data]
            assert max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)) < 1e-5, name
        else:
            route = "/v1/rewards" if kind == "reward" else "/v1/classify"
            r = httpx.post(served["url"] + route, headers=h, json={"model": name, "input": items}, timeout=60)
            assert r.status_code == 200, (name, r.text)
            data = r.json()["data"]
            if kind == "reward":
                assert max(abs(d["score"] - w) for d, w in zip(data, want, strict=True)) < 1e-5, name
            else:  # the run's label names (not LABEL_0 / LABEL_1) and its probabilities
                for d, w in zip(data, want, strict=True):
                    assert d["scores"] == pytest.approx(w, abs=1e-5), name
        kinds.add(kind)
    assert kinds == {"classifier", "reward", "embedding"}


@pytest.mark.integration
def test_bad_requests_get_openai_errors(served, client):
    httpx = _httpx()

    url, h = served["url"], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = {
        "malformed json": (chat, h, b'{"model": "tiny", "messages": [', 400, "invalid_json"),
        "missing messages": (chat, h, {"model": "tiny"}, 400, "invalid_value"),
        "unknown model": (chat, h, {"model": "nope", "messages": msgs}, 404, "model_not_found"),
        "unknown adapter": (chat, h, {"model": "tiny:nope", "messages": msgs}, 404, "model_not_found"),
        "path traversal": (chat, h, {"model": "tiny:../../etc/passwd", "messages": msgs}, 400, "invalid_model"),
        "max_tokens over cap": (chat, h, {"model": "tiny", "messages": msgs, "max_tokens": 65}, 400, "max_tokens_exceeded"),
        "n over cap": (chat, h, {"model": "tiny", "messages": msgs, "n": 5}, 400, "n_exceeded"),
        "prompt over limit": (url + "/v1/completions", h, {"model": "tiny", "prompt": "1+1=" * 40}, 400, "context_length_exceeded"),
        "body over cap": (chat, h, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}, 413, "request_too_large"),
        "no api key": (chat, {"Content-Type": "application/json"}, {"model": "tiny", "messages": msgs}, 401, "invalid_api_key"),
        "wrong api key": (chat, {**h, "Authorization": "Bearer sk-wrong"}, {"model": "tiny", "messages": msgs}, 401, "invalid_api_key"),
        "wrong kind": (url + "/v1/embeddings", h, {"model": "tiny", "input": "x"}, 404, "model_not_found"),
    }
    with httpx.Client(timeout=30) as c:
        for what, (u, hdr, body, status, code) in cases.items():
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post(u, headers=hdr, content=data)
            assert r.status_code == status, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["message"] and err["type"], (what, err)
        assert "64" in c.post(chat, headers=h, json={"model": "tiny", "messages": msgs, "max_tokens": 65}).json()["error"]["message"]
        assert c.get(url + "/v1/models").status_code == 401
        assert c.get(url + "/healthz").json() == {"status": "ok"}
    assert client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2).choices  # still serving


@pytest.mark.integration
def test_overload_gets_429_quickly_and_the_rest_succeed(served):
    httpx = _httpx()

    # 8 ongoing + 8 queued fit in the generator; the rest of 48 concurrent requests are refused.
    async def one(c):
        t = time.monotonic()
        r = await c.post("/v1/completions", json={"model": "tiny:sft-a", "prompt": "1+1=", "max_tokens": 48, "temperature": 0})
        return r.status_code, time.monotonic() - t, r.headers.get("retry-after"), r.json()

    async def burst():
        async with httpx.AsyncClient(base_url=served["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*[one(c) for _ in range(48)])

    res = asyncio.run(burst())
    ok = [r for r in res if r[0] == 200]
    refused = [r for r in res if r[0] in (429, 503)]
    assert len(ok) + len(refused) == len(res), [r[0] for r in res]
    assert ok and refused, [r[0] for r in res]
    assert all(r[2] is not None and r[3]["error"]["type"] for r in refused if r[0] == 429)
    assert max(r[1] for r in refused) < min(max(r[1] for r in ok), 30)  # refused before the work was done


@pytest.mark.integration
def test_streams_are_admitted_or_refused_before_their_200(served):
    httpx = _httpx()

    # A stream holds one of the generator's 8 ongoing requests until it ends: 8 ongoing + 8 queued fit, the rest of
    # 48 are refused with a 429 of their own, never a 200 whose stream then says it failed.
    async def one(c):
        body = {"model": "tiny:sft-a", "prompt": "1+1=", "max_tokens": 64, "temperature": 0, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            return r.status_code, r.headers.get("retry-after"), (await r.aread()).decode()

    async def burst():
        async with httpx.AsyncClient(base_url=served["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*[one(c) for _ in range(48)])

    res = asyncio.run(burst())
    ok, refused = [r for r in res if r[0] == 200], [r for r in res if r[0] == 429]
    assert ok and refused and len(ok) + len(refused) == len(res), [r[0] for r in res]
    for _, retry, text in refused:
        assert retry and json.loads(text)["error"]["code"] == "overloaded", text
    for _, _, text in ok:
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text


def test_deploy_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from ftray.serve.config import ServeConfig

    doc = yaml.safe_load((ROOT / "deploy" / "adapters.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "ftray.serve.app:build_app"
    ServeConfig.model_validate(app.args)  # the module's running app is these args with test paths


def test_config_from_runs_and_cli(tiny_model, work):
    from ftray.cli import build_parser
    from ftray.serve import config_from_runs
    from ftray.serve.config import ServeConfig

    runs = work / "cfg-runs"
    make_adapter_run(tiny_model, runs / "sft-x", seed=1)
    make_scorer_run(tiny_model, runs / "rm-x", ["reward"])
    cfg = ServeConfig.model_validate(config_from_runs([str(runs / "sft-x"), str(runs / "rm-x")], name="tiny"))
    assert cfg.generation[0].name == "tiny" and list(cfg.generation[0].adapters) == ["sft-x"]
    assert cfg.scorers[0].kind == "reward"
    args = build_parser().parse_args(["serve", str(runs / "sft-x"), "--port", "8123"])
    assert args.port == 8123 and args.fn.__name__ == "cmd_serve"
    from ftray.cli import main

    assert main(["serve", str(runs / "sft-x"), "--host", "0.0.0.0", "--api-keys-file", "/dev/null"]) == 2  # no keys


def test_adapter_names_are_validated(tiny_model, work):
    from ftray.serve.config import GenerationModel
    from ftray.serve.registry import AdapterError, AdapterRegistry

    reg = work / "reg-unit"
    make_adapter_run(tiny_model, reg / "ok", seed=3)
    (reg / "pickled" / "adapter").mkdir(parents=True)
    (reg / "pickled" / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    (reg / "pickled" / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04")
    (reg / "pickled" / "adapter" / ".complete").write_text("ok\n")
    (reg / "pickled" / "run.json").write_text(json.dumps({"status": "completed"}))
    make_adapter_run(tiny_model, reg / "running", seed=4)
    (reg / "running" / "run.json").unlink()  # the trainer writes run.json last
    ia3 = make_adapter_run(tiny_model, reg / "ia3", seed=5) / "adapter" / "adapter_config.json"
    ia3.write_text(json.dumps({**json.loads(ia3.read_text()), "peft_type": "IA3"}))  # no per-request selection
    r = AdapterRegistry(GenerationModel(name="tiny", base=str(tiny_model), registry=[str(reg)]), str(tiny_model))
    assert r.lookup("ok").endswith("adapter")
    for bad, status in [("../../etc/passwd", 400), ("a/b", 400), ("..", 400), ("", 400), ("missing", 404), ("pickled", 400), ("running", 409), ("ia3", 400)]:
        with pytest.raises(AdapterError) as e:
            r.lookup(bad)
        assert e.value.status == status, bad
    assert "ok" in r.names()


def test_timeouts_and_backpressure_map_to_408_429():
    """The ingress' mapping of Serve failures, on stand-ins for a deployment response (no Ray)."""
    from types import SimpleNamespace

    from ray.serve.exceptions import BackPressureError

    from ftray.serve.api import APIError, Ingress
    from ftray.serve.config import Limits

    class Slow:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(60).__await__()

        def cancel(self):
            self.cancelled = True

    class Full:
        def __await__(self):
            async def boom():
                raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

            return boom().__await__()

    me = SimpleNamespace(limits=Limits(request_timeout_s=0.2, retry_after_s=2))
    me._retry = lambda: {"Retry-After": "2"}
    call = Ingress.func_or_class._call
    slow = Slow()
    t = time.monotonic()
    with pytest.raises(APIError) as e:
        asyncio.run(call(me, slow, time.monotonic() + 0.2))
    assert e.value.status == 408 and slow.cancelled and time.monotonic() - t < 5
    with pytest.raises(APIError) as e:
        asyncio.run(call(me, Full(), time.monotonic() + 5))
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "2"}


def test_adapter_rewritten_under_same_name_is_reloaded(tiny_model, work):
    """A run trained again into the folder of a served adapter: the replica loads the new weights on the next
    request once the new version is complete, and keeps serving the old one while the rewrite is going on."""
    from ftray import storage
    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    reg = work / "reg-rewrite"
    make_adapter_run(tiny_model, reg / "same", seed=21)
    engine = LoraEngine(GenerationModel(name="tiny", base=str(tiny_model), registry=[str(reg)], reload_check_s=0))
    ids = _ids(tiny_model, "12+7=")
    req = {"adapter": "same", "input_ids": ids, "max_tokens": 10, "temperature": 0}
    first = engine.generate([req])[0]["token_ids"]
    assert first == peft_greedy(tiny_model, reg / "same" / "adapter", ids, 10)

    def retrain(seed: int) -> None:  # a new version written aside, then put in place as the trainer does
        new = make_adapter_run(tiny_model, work / f"rewrite-{seed}", seed=seed)
        storage.publish_dir(new / "adapter", str(reg / "same" / "adapter"))

    retrain(22)
    second = engine.generate([req])[0]["token_ids"]
    assert second == peft_greedy(tiny_model, reg / "same" / "adapter", ids, 10) and second != first

    # A rewrite in progress (run.json is written last): the old version keeps answering.
    run_json = (reg / "same" / "run.json").read_text()
    (reg / "same" / "run.json").unlink()
    retrain(23)
    assert engine.generate([req])[0]["token_ids"] == second
    (reg / "same" / "run.json").write_text(run_json)
    third = engine.generate([req])[0]["token_ids"]
    assert third == peft_greedy(tiny_model, reg / "same" / "adapter", ids, 10)
    assert list(engine.loaded) == ["same"]
