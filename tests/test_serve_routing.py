"""Adapter-aware routing (issue 17, item 3): with 2 generator replicas and 4 adapters, Serve's model
multiplexing sends each adapter's requests to the one replica that holds it, through the real HTTP ingress
and the real openai client, streams included; the answers are those of a single replica. And the eviction
half on its own: Serve's multiplex LRU dropping an adapter drops it from the engine."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests._serve_models import make_adapter_run
from tests._specs import free_port

KEY = "sk-mux-test"
ADAPTERS = ["m0", "m1", "m2", "m3"]
PROMPTS = ["2+3=", "12+7=", "19+19="]


def _ids(base: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]


def test_multiplex_eviction_drops_the_adapter_from_the_engine(tiny_model, work):
    """What Serve does on eviction (ray 2.60 `unload_model_lru` calls the held object's `__del__`), and what
    Python does when it later collects that object, on the engine a replica runs (no Ray)."""
    from ftray.serve.config import GenerationModel
    from ftray.serve.deployments import _Held
    from ftray.serve.engine import LoraEngine

    reg = work / "mux-evict"
    for i, name in enumerate(["x1", "x2"]):
        make_adapter_run(tiny_model, reg / name, seed=60 + i)
    engine = LoraEngine(GenerationModel(name="tiny", base=str(tiny_model), registry=[str(reg)]))
    req = {"adapter": "x1", "input_ids": _ids(tiny_model, "2+3="), "max_tokens": 6, "temperature": 0}
    first = engine.generate([req])[0]["token_ids"]
    assert not engine.ensure_loaded({"x2"}) and list(engine.loaded) == ["x1", "x2"]
    assert engine.stacked.names == ["x1", "x2"]

    held = _Held(engine, "x1")
    held.__del__()  # Serve evicted "x1"
    assert not engine.ensure_loaded({"x2"}) and list(engine.loaded) == ["x2"] and "x1" not in engine.peft.peft_config
    assert engine.stacked.names == ["x2"]  # its stacked weights went with it
    assert engine.generate([req])[0]["token_ids"] == first  # asked again: loaded again, same answer
    held.__del__()  # the old holder collected later: "x1", held anew, stays
    assert not engine.ensure_loaded({"x2"}) and set(engine.loaded) == {"x1", "x2"}


@pytest.fixture(scope="module")
def mux(ray_local, tiny_model, work):
    from ray import serve

    from ftray.serve import build_app

    reg = work / "mux-registry"
    for i, name in enumerate(ADAPTERS):
        make_adapter_run(tiny_model, reg / name, seed=70 + i)
    keys = work / "mux_keys.txt"
    keys.write_text(f"{KEY}\n")
    dep = {"num_replicas": 2, "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
           "max_ongoing_requests": 32, "max_queued_requests": 64}  # 32: no replica is full, so none spills over
    cfg = {"generation": [{"name": "tiny", "base": str(tiny_model), "registry": [str(reg)], "max_loaded_adapters": 4,
                           "deployment": dep}],
           "auth": {"api_keys_env": None, "api_keys_file": str(keys)},
           "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 64, "max_queued_requests": 64, "max_batch_size": 1}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="mux", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "base": tiny_model, "cfg": cfg}
    serve.shutdown()


@pytest.mark.integration
def test_two_replicas_four_adapters_each_adapter_on_one_replica(mux):
    from openai import OpenAI
    from ray import serve
    from transformers import AutoTokenizer

    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    client = OpenAI(base_url=mux["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def ask(adapter: str | None, prompt: str, stream: bool = False) -> tuple[str, str, str, str]:
        model = f"tiny:{adapter}" if adapter else "tiny"
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=stream)
        got = raw.parse()
        text = "".join(c.choices[0].text for c in got) if stream else got.choices[0].text
        return model, prompt, text, raw.headers["x-ftray-replica"]

    # Each adapter's first request alone, then a pause: a replica tells the controller what it holds every
    # 0.1 s and the controller tells the routers on its next loop; until then a new adapter goes to the replica
    # with the fewest. Then every adapter again, interleaved and 12 at a time, streams and the base among them.
    first = []
    for a in ADAPTERS:
        first.append(ask(a, PROMPTS[0]))
        time.sleep(0.5)
    jobs = [(a, p, False) for p in PROMPTS for a in ADAPTERS] + [(a, PROMPTS[1], True) for a in ADAPTERS]
    jobs += [(None, p, s) for p in PROMPTS for s in (False, True)]
    with ThreadPoolExecutor(12) as pool:
        rest = list(pool.map(lambda j: ask(*j), jobs))
    answers = first + rest

    by_adapter: dict[str, set[str]] = {}
    for model, _, _, replica in answers:
        by_adapter.setdefault(model, set()).add(replica)
    assert all(len(by_adapter[f"tiny:{a}"]) == 1 for a in ADAPTERS), by_adapter
    replicas = {r for a in ADAPTERS for r in by_adapter[f"tiny:{a}"]}
    assert len(replicas) == 2, by_adapter  # both replicas took adapters (the fewest-loaded one gets a new adapter)

    # Each replica's engine holds exactly the adapters it answered for (reached through an adapter it holds).
    gen = serve.get_deployment_handle("gen-tiny", app_name="mux")
    for a in ADAPTERS:
        held = gen.options(multiplexed_model_id=a).loaded_adapters.remote().result()
        (mine,) = by_adapter[f"tiny:{a}"]
        assert sorted(held) == sorted(b for b in ADAPTERS if by_adapter[f"tiny:{b}"] == {mine}), (a, held, by_adapter)

    # Routed requests for different adapters of one replica still share a batch and one generate (Serve would
    # split a batch by multiplexed model id).
    mine = max(replicas, key=lambda r: sum(by_adapter[f"tiny:{a}"] == {r} for a in ADAPTERS))
    theirs = [a for a in ADAPTERS if by_adapter[f"tiny:{a}"] == {mine}]

    async def together():
        return await asyncio.gather(*[
            gen.options(multiplexed_model_id=a).generate.remote(
                {"adapter": a, "input_ids": _ids(mux["base"], p), "max_tokens": 4, "temperature": 0})
            for p in PROMPTS for a in theirs])

    outs = asyncio.run(together())
    assert len(theirs) >= 2 and {o["replica"] for o in outs} == {mine}, (theirs, outs)
    assert max(o["adapters_in_batch"] for o in outs) >= 2, outs

    # The answers of one replica (the engine a replica runs, in this process) for the same requests.
    engine = LoraEngine(GenerationModel.model_validate(mux["cfg"]["generation"][0]))
    tok = AutoTokenizer.from_pretrained(mux["base"])
    reqs = [{"adapter": m.partition(":")[2] or None, "input_ids": _ids(mux["base"], p), "max_tokens": 8, "temperature": 0}
            for m, p, _, _ in answers]
    alone = [tok.decode(o["token_ids"], skip_special_tokens=True) for o in engine.generate(reqs)]
    assert [t for _, _, t, _ in answers] == alone
    assert len({t for (m, p, t, _) in answers if p == PROMPTS[0]}) >= 4  # the adapters answer differently
