"""The model deployments: `Generator` (one base + many LoRA adapters, continuous batching) and `Scorer`
(embedding, classifier or reward model). Each scales on its own (see `config.Deployment`).

Calling them from Python, without HTTP (e.g. the RLHF loop scoring its rollouts). Deployments are
named `gen-<name>` and `score-<name>` inside the application (`ftray` for `ftray serve`, the
`name:` of the application in a Serve config file):

    from ray import serve
    rm = serve.get_deployment_handle("score-rm", app_name="ftray")
    scores = await rm.score.remote([{"prompt": "2+3=", "response": "5"},
                                    {"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]}])
    # -> [{"score": 0.41, "tokens": 9}, ...]; outside async code: rm.score.remote(items).result()

    gen = serve.get_deployment_handle("gen-tiny", app_name="ftray")
    out = gen.generate.remote({"adapter": "sft-a", "input_ids": ids, "max_tokens": 32,
                               "temperature": 0.0}).result()   # {"token_ids", "finish_reason", ...}

`embed(texts)` and `classify(texts)` work the same way on embedding and classifier deployments.
Every request in a handle call is batched with the HTTP traffic, and errors come back as
{"error": {...}} dicts rather than exceptions, so one bad rollout does not fail a batch.

Adapter-aware routing (Serve model multiplexing). The ingress calls the generator with
`.options(multiplexed_model_id=<adapter>)` (config `route_by_adapter`, on by default): Serve's router
sends the request to a replica that holds the adapter (one that holds the fewest when none does), and
each replica keeps the adapters it was asked for in Serve's multiplex LRU of `max_loaded_adapters`,
whose eviction deletes the adapter from the engine too. With 2 replicas and 4 adapters each adapter
is loaded on one replica, not on both (tests/test_serve_routing.py). Base-model requests carry no id:
every replica holds the base, and an id would pin all of them to one replica. A handle caller may
route the same way, `gen.options(multiplexed_model_id="sft-a").generate.remote({"adapter": "sft-a", ...})`;
without the id its request goes to any replica, which loads the adapter on first use as before.
A result names the replica that made it (`"replica"`; over HTTP the `x-ftray-replica` header).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from ftray.serve.config import GenerationModel, ScorerModel

__all__ = ["Generator", "Scorer"]

_YIELDS = 4  # loop iterations between decoding steps (`Generator._steps`): the second-stream test passes from 2 (fails at 1); 4 leave room


def _threads(num_cpus: float) -> None:
    import torch

    # Ray sets OMP_NUM_THREADS=1 in replicas only when num_cpus is unset; give torch what we reserved.
    torch.set_num_threads(max(1, int(num_cpus)))


class _Held:
    """What Serve's multiplex LRU keeps per adapter. Serve calls `__del__` when it evicts one (on a worker
    thread), and Python calls it again when the object is collected: the engine is told once."""

    def __init__(self, engine, name: str):
        self.engine, self.name, self.held = engine, name, True

    def __del__(self):
        if self.held:
            self.held = False
            self.engine.release(self.name)


@serve.deployment(name="generator")
class Generator:
    def __init__(self, model: dict):
        from ftray.serve.engine import LoraEngine

        self.cfg = GenerationModel.model_validate(model)
        _threads(self.cfg.deployment.num_cpus)
        self.engine = LoraEngine(self.cfg)
        self._lock = asyncio.Lock()  # no decoding step while peft's adapters change
        self._driver: asyncio.Task | None = None  # runs the batch's steps while there is work (`_steps`)
        self.replica = serve.get_replica_context().replica_tag

        async def load(name: str) -> _Held:
            async with self._lock:  # no batch or stream runs while peft's adapters change
                failed = await asyncio.to_thread(self.engine.ensure_loaded, {name})
            if failed:  # raised, so that Serve neither keeps nor advertises it
                raise failed[name]
            return _Held(self.engine, name)

        # Made here, not as a decorated method: its size is the config's (Serve 2.60 finds it on the instance).
        self._hold = serve.multiplexed(max_num_models_per_replica=self.cfg.max_loaded_adapters)(load)

    async def _route(self, req: dict) -> dict | None:
        """Holds the adapter of a request routed by it (`multiplexed_model_id`) in Serve's multiplex LRU, which
        is what Serve's router reads; None, or an error dict when it cannot be loaded."""
        from ftray.serve.engine import adapter_error, error
        from ftray.serve.registry import AdapterError

        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return None
        if model_id != req.get("adapter"):
            return error(f"multiplexed_model_id {model_id!r} is not the request's adapter {req.get('adapter')!r}",
                         code="invalid_value")
        try:
            await self._hold(model_id)
        except AdapterError as e:
            return adapter_error(e)
        return None

    async def generate(self, req: dict) -> dict:
        """One request (the keys `LoraEngine.generate` reads: adapter, input_ids, max_tokens, temperature, top_p,
        seed, stop, presence_penalty, frequency_penalty, logit_bias, logprobs); it joins the running batch."""
        err = await self._route(req)
        if err is not None:
            return err
        fut = asyncio.get_running_loop().create_future()
        self.engine.submit(req, lambda res: fut.done() or fut.set_result(res))
        self._drive()
        out = await fut
        return out if "error" in out else {**out, "replica": self.replica}

    def _drive(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._steps())

    async def _steps(self) -> None:
        """Continuous batching (`ftray.serve.batcher`): one decoding step of the running batch at a time, on the
        replica's user-code event loop (Serve runs it on its own thread, apart from health checks and the request
        queue), yielding between steps so that requests arriving meanwhile join the next step. Not in a worker
        thread: a second Python thread would fight the decoding loop for the GIL (measured on 2 CPU cores with
        static batches, `small` model, 16 callers: 9.1 req/s in a thread, 17.1 on the loop).

        A step holds the loop, so work that arrived during it runs only in these yields, one loop iteration each: a
        new request's task starts in one and reaches `submit` in the next, and the tokens of the step go out. One
        yield (as before) left a newcomer a step behind for each iteration it needed (over HTTP with SmolLM2 at
        concurrency 16: p50 time to first token 1.6-1.9 s, against 1.1-1.2 s with `_YIELDS`)."""
        while self.engine.batcher.busy():
            async with self._lock:
                self.engine.batcher.step()
            for _ in range(_YIELDS):
                await asyncio.sleep(0)

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        """Yields {"admitted": True, "replica": tag} at once (this replica has taken the request: the ingress answers 200 only
        then), or an error dict for an adapter it cannot serve and nothing more; then {"token_ids": [...]} (with
        "logprobs" when asked) as tokens come, then a final {finish_reason, prompt_tokens, completion_tokens}.
        The stream decodes in the running batch beside other streams and whole answers."""
        adapter = req.get("adapter")
        if adapter is None or self.engine.registry.known(adapter):
            err = self.check(adapter)  # from memory: no trip through a worker thread, which costs loop iterations
        else:
            err = await asyncio.to_thread(self.check, adapter)  # a miss may list an s3:// registry
        if err is None:
            err = await self._route(req)
        if err is not None:
            yield err
            return
        yield {"admitted": True, "replica": self.replica}
        q: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        self.engine.submit(req, lambda res: q.put_nowait((True, res)), lambda item: q.put_nowait((False, item)), cancelled)
        self._drive()
        try:
            while True:
                last, item = await q.get()
                yield item
                if last:
                    break
        finally:
            cancelled.set()  # the client went away: its row leaves the batch at the next step

    def adapters(self) -> list[str]:
        return self.engine.registry.names()

    def loaded_adapters(self) -> list[str]:
        return list(self.engine.loaded)

    def check(self, adapter: str | None) -> dict | None:
        """None when `adapter` is servable, else an error dict (404 unknown, 400 invalid name)."""
        from ftray.serve.engine import adapter_error
        from ftray.serve.registry import AdapterError

        if adapter is None:
            return None
        try:
            self.engine.registry.lookup(adapter)
        except AdapterError as e:
            return adapter_error(e)
        return None


@serve.deployment(name="scorer")
class Scorer:
    def __init__(self, model: dict):
        from ftray.serve.engine import ScorerEngine

        self.cfg = ScorerModel.model_validate(model)
        _threads(self.cfg.deployment.num_cpus)
        self.engine = ScorerEngine(self.cfg)
        self._batched.set_max_batch_size(self.cfg.deployment.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.deployment.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, calls: list[list[Any]]) -> list[list[dict]]:
        flat = [x for c in calls for x in c]
        rows = await asyncio.to_thread(self.engine.run, flat) if flat else []
        out, k = [], 0
        for c in calls:
            out.append(rows[k : k + len(c)])
            k += len(c)
        return out

    async def embed(self, texts: list[str]) -> list[dict]:
        """[{"embedding": [...], "tokens": n}] per text (unit length)."""
        return await self._batched(list(texts))

    async def classify(self, texts: list[str]) -> list[dict]:
        """[{"label", "score", "scores": {label: p}, "tokens"}] per text."""
        return await self._batched(list(texts))

    async def score(self, items: list[Any]) -> list[dict]:
        """Reward per item: a string, {"prompt", "response"} or {"messages": [...]} -> [{"score", "tokens"}]."""
        return await self._batched(list(items))

    def kind(self) -> str:
        return self.cfg.kind
