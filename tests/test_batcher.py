"""Continuous batching (ftray/serve/batcher.py) through LoraEngine, without Ray: requests join the running batch
between decoding steps and leave at their own end, streams and whole answers share it, and every row still gets
the tokens it gets alone; finished rows leave the cache, and an adapter in use is neither evicted nor reloaded."""

from __future__ import annotations

import os
import threading

import pytest

from tests._serve_models import make_adapter_run

PROMPTS = ["12+7=", "3+4=", "19+19=", "1+1=", "7+8=", "99+1="]


@pytest.fixture(scope="module")
def runs(tiny_model, work) -> dict[str, str]:
    return {name: str(make_adapter_run(tiny_model, work / "batcher" / name, seed=seed))
            for name, seed in (("ad-a", 41), ("ad-b", 42), ("ad-c", 43))}


def _engine(tiny_model, runs, **kw):
    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    return LoraEngine(GenerationModel(name="tiny", base=str(tiny_model), adapters=runs, **kw), device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_model, runs):
    return _engine(tiny_model, runs)


def _req(engine, prompt: str, adapter: str | None = None, max_tokens: int = 8, **more) -> dict:
    tok = engine.tokenizer
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    return {"adapter": adapter, "input_ids": ids, "max_tokens": max_tokens, "temperature": 0.0, **more}


class _Calls:
    """What the batcher told each request, and at which step."""

    def __init__(self):
        self.done: dict[str, dict] = {}
        self.at: dict[str, int] = {}
        self.tokens: dict[str, list[int]] = {}
        self.step = 0

    def finish(self, key: str):
        def done(res: dict) -> None:
            self.done[key], self.at[key] = res, self.step
        return done

    def emit(self, key: str):
        return lambda item: self.tokens.setdefault(key, []).extend(item["token_ids"])


def _steps(engine, calls: _Calls, n: int | None = None) -> None:
    while engine.batcher.busy() and (n is None or n > 0):
        engine.batcher.step()
        calls.step += 1
        n = None if n is None else n - 1


def test_requests_join_between_steps_and_leave_at_their_own_end(engine):
    long = _req(engine, PROMPTS[0], "ad-a", max_tokens=24, stop=None)
    short = _req(engine, PROMPTS[1], "ad-b", max_tokens=3)
    streamed = _req(engine, PROMPTS[2], None, max_tokens=6)
    alone = {k: engine.generate([r])[0] for k, r in (("long", long), ("short", short), ("streamed", streamed))}
    assert alone["long"]["finish_reason"] == "length" and len(alone["long"]["token_ids"]) == 24  # runs its whole length

    calls = _Calls()
    engine.submit(long, calls.finish("long"))
    _steps(engine, calls, 5)  # the long answer is decoding alone
    assert [len(s.tokens) for s in engine.batcher.rows] == [6] and engine.batcher.mask.shape[0] == 1
    engine.submit(short, calls.finish("short"))
    engine.submit(streamed, calls.finish("streamed"), calls.emit("streamed"), threading.Event())
    _steps(engine, calls)

    # The newcomers joined the running batch at once (3 rows, 3 adapters counting the base as none) and each left
    # at its own end, long before the long one.
    assert calls.done["short"]["batch_size"] == 3 and calls.done["short"]["adapters_in_batch"] == 2
    # A row admitted at step s has 2 tokens after it (prefill, then the step's decoding) and n after step s + n - 2.
    assert calls.at["short"] == 5 + 3 - 2 and calls.at["streamed"] <= 5 + 6 - 2 < calls.at["long"] == 24 - 2
    # Each got the tokens it gets alone: joining a batch mid-way (left-padded into its cache) changes nothing.
    assert calls.done["long"]["token_ids"] == alone["long"]["token_ids"]
    assert calls.done["short"]["token_ids"] == alone["short"]["token_ids"]
    assert calls.tokens["streamed"] == alone["streamed"]["token_ids"]  # the stream, token by token
    assert calls.done["streamed"] == {"finish_reason": alone["streamed"]["finish_reason"],
                                      "prompt_tokens": len(streamed["input_ids"]),
                                      "completion_tokens": len(alone["streamed"]["token_ids"])}
    assert not engine.batcher.busy() and engine.batcher.cache is None


def test_a_finished_row_leaves_the_cache_and_its_padding_is_cut(engine):
    calls = _Calls()
    wide = _req(engine, "19+19=" * 6, max_tokens=4)  # a long prompt that ends soon
    narrow = _req(engine, PROMPTS[3], max_tokens=12)
    engine.submit(wide, calls.finish("wide"))
    engine.submit(narrow, calls.finish("narrow"))
    _steps(engine, calls, 1)
    width = engine.batcher.mask.shape[1]
    assert width == len(wide["input_ids"]) + 1
    _steps(engine, calls, 2)  # wide has ended
    assert "wide" in calls.done and [len(s.prompt) for s in engine.batcher.rows] == [len(narrow["input_ids"])]
    # Only the narrow row's own columns are left (its prompt and the 3 tokens fed since), in the mask and every layer.
    assert engine.batcher.mask.shape[1] == len(narrow["input_ids"]) + 3 < width
    assert all(layer.keys.shape[:3] == (1, layer.keys.shape[1], engine.batcher.mask.shape[1]) for layer in engine.batcher.cache.layers)
    _steps(engine, calls)
    assert calls.done["narrow"]["token_ids"] == engine.generate([narrow])[0]["token_ids"]


def test_a_cancelled_stream_leaves_the_batch(engine):
    calls, cancel = _Calls(), threading.Event()
    engine.submit(_req(engine, PROMPTS[0], "ad-a", max_tokens=20), calls.finish("kept"))  # runs its whole length
    engine.submit(_req(engine, PROMPTS[0], "ad-a", max_tokens=20), calls.finish("gone"), calls.emit("gone"), cancel)
    _steps(engine, calls, 3)
    cancel.set()
    _steps(engine, calls, 1)
    assert len(engine.batcher.rows) == 1 and len(calls.tokens["gone"]) == 4
    _steps(engine, calls)
    assert "gone" not in calls.done and len(calls.done["kept"]["token_ids"]) == 20


def test_an_adapter_in_use_is_not_evicted_and_others_wait_for_room(tiny_model, runs):
    engine = _engine(tiny_model, runs, max_loaded_adapters=1)
    calls = _Calls()
    first = _req(engine, PROMPTS[0], "ad-a", max_tokens=6)
    second = _req(engine, PROMPTS[1], "ad-b", max_tokens=2)
    engine.submit(first, calls.finish("first"))
    _steps(engine, calls, 1)
    engine.submit(second, calls.finish("second"))
    _steps(engine, calls, 2)
    # One adapter fits: ad-b waits (its eviction of ad-a would change ad-a's running answer).
    assert list(engine.loaded) == ["ad-a"] and [s.adapter for s in engine.batcher.rows] == ["ad-a"]
    engine.release("ad-a")  # Serve's multiplex LRU evicts it meanwhile: it stays until its row ends
    engine.ensure_loaded(set())
    assert list(engine.loaded) == ["ad-a"]
    _steps(engine, calls)
    assert calls.at["first"] < calls.at["second"] and list(engine.loaded) == ["ad-b"]
    assert calls.done["first"]["token_ids"] == engine.generate([first])[0]["token_ids"]
    again = engine.generate([second])[0]
    assert calls.done["second"]["token_ids"] == again["token_ids"]


def test_alone_equals_transformers_generate(engine):
    """The batcher's own decoding loop (positions, mask, cache) against transformers' `generate`, greedy, for the
    base and an adapter (the other tests show a row gets the same tokens alone and joining a running batch)."""
    import contextlib

    import torch

    for adapter in (None, "ad-a"):
        req = _req(engine, PROMPTS[2], adapter, max_tokens=12)
        ours = engine.generate([req])[0]["token_ids"]
        if adapter is None:
            model, ctx = engine.model, engine.peft.disable_adapter() if engine.peft is not None else contextlib.nullcontext()
        else:
            model, ctx = engine.peft, contextlib.nullcontext()
            model.set_adapter(adapter)
        with torch.inference_mode(), ctx:
            ref = model.generate(input_ids=torch.tensor([req["input_ids"]]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=engine.pad, eos_token_id=sorted(engine.eos_ids))[0, len(req["input_ids"]):].tolist()
        ends = [k for k, t in enumerate(ref) if t in engine.eos_ids]
        assert ours == ref[: ends[0] if ends else len(ref)], adapter
        assert len(ours) >= 4, ours  # a comparison over some tokens, not an empty answer


def test_an_unexpected_error_fails_every_request_once_and_the_batcher_goes_on(tiny_model, runs, monkeypatch):
    engine = _engine(tiny_model, runs)
    calls = _Calls()
    engine.submit(_req(engine, PROMPTS[0], "ad-a", max_tokens=8), calls.finish("running"))
    _steps(engine, calls, 1)
    engine.submit(_req(engine, PROMPTS[1], "ad-a", max_tokens=8), calls.finish("waiting"))

    def broken(name):
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(engine, "stale", broken)  # raised while admitting, outside the model's forward
    _steps(engine, calls, 1)
    assert {k: v["error"]["status"] for k, v in calls.done.items()} == {"running": 500, "waiting": 500}
    assert "registry exploded" in calls.done["waiting"]["error"]["message"] and not engine.batcher.busy()
    monkeypatch.undo()
    assert len(engine.generate([_req(engine, PROMPTS[0], "ad-a", max_tokens=8)])[0]["token_ids"]) > 0


def _burst(tiny_model, runs, pause_s: float):
    """Five prompts of 12, 5, 4, 2 and 1 units ("1+1="), EOS banned, and a budget of 2 x the 5-unit prompt's
    length: (engine, requests, calls, first step each request got a token at, lengths, budget)."""
    from ftray.models.load import load_tokenizer

    unit = load_tokenizer(str(tiny_model))("1+1=", add_special_tokens=False)["input_ids"]
    reps = {"n12": 12, "n5": 5, "n4": 4, "n2": 2, "n1": 1}  # submitted in this order
    lengths = {k: 1 + n * len(unit) for k, n in reps.items()}
    budget = 2 * lengths["n5"]
    engine = _engine(tiny_model, runs, deployment={"prefill_tokens": budget, "prefill_pause_s": pause_s})
    eos = min(engine.eos_ids)

    def req(n: int, adapter: str | None) -> dict:  # EOS banned: every row decodes all of its max_tokens
        return {"adapter": adapter, "input_ids": [engine.tokenizer.bos_token_id] + unit * n, "max_tokens": 6,
                "temperature": 0.0, "logit_bias": {eos: -100.0}}

    reqs = {k: req(n, "ad-a" if n % 2 else None) for k, n in reps.items()}
    reqs["late"] = req(1, "ad-b")
    calls, first = _Calls(), {}

    def emit(key: str):
        def f(item: dict) -> None:
            first.setdefault(key, calls.step)
            calls.tokens.setdefault(key, []).extend(item["token_ids"])
        return f

    for k in reps:
        engine.submit(reqs[k], calls.finish(k), emit(k))
    return engine, reqs, calls, first, emit, lengths, budget


def test_a_burst_is_prefilled_shortest_first_in_groups_under_the_token_budget(tiny_model, runs):
    """Five prompts arrive at once (longest first), then a sixth, the shortest, one step later. With a budget of
    2 x the fourth prompt's length they are prefilled in groups {1st, 2nd shortest}, {3rd, 4th}, {the longest
    alone: it exceeds the budget}, each at its own step while the earlier rows decode (`prefill_pause_s` 0); the
    late one comes after all of them (older requests first), and every answer is the one it gets alone."""
    engine, reqs, calls, first, emit, lengths, budget = _burst(tiny_model, runs, 0.0)
    _steps(engine, calls, 1)
    assert len(engine.batcher.rows) == 2 and engine.batcher.mask.shape[1] == lengths["n2"] + 1
    engine.submit(reqs["late"], calls.finish("late"), emit("late"))
    _steps(engine, calls)
    assert first == {"n1": 0, "n2": 0, "n4": 1, "n5": 1, "n12": 2, "late": 3}
    assert lengths["n12"] > budget and 3 * lengths["n4"] > budget  # the groups above are the budget's, not chance
    for k, r in reqs.items():
        assert calls.tokens[k] == engine.generate([r])[0]["token_ids"] and len(calls.tokens[k]) == 6, k
    assert calls.done["n1"]["finish_reason"] == "length" and not engine.batcher.busy()


def test_prefill_first_admits_the_whole_burst_before_the_running_rows_decode(tiny_model, runs):
    """The same burst with `prefill_pause_s` longer than it: the same groups, one per step, and no decoding step
    until none waits: after the second step every admitted row has its first token only; the step that admits
    the last group decodes every row; the answers are the ones they get alone. (With 0, the test above: the first
    group has decoded a token by the end of the first step.)"""
    engine, reqs, calls, first, emit, lengths, budget = _burst(tiny_model, runs, 1e9)
    _steps(engine, calls, 2)
    assert {k: len(v) for k, v in calls.tokens.items()} == {"n1": 1, "n2": 1, "n4": 1, "n5": 1}
    assert engine.batcher.mask.shape[1] == lengths["n5"]  # prefilled columns only: nothing decoded yet
    _steps(engine, calls, 1)
    assert {k: len(v) for k, v in calls.tokens.items()} == {"n1": 2, "n2": 2, "n4": 2, "n5": 2, "n12": 2}
    engine.submit(reqs["late"], calls.finish("late"), emit("late"))
    _steps(engine, calls)
    assert first == {"n1": 0, "n2": 0, "n4": 1, "n5": 1, "n12": 2, "late": 3}
    for k, r in reqs.items():
        assert calls.tokens[k] == engine.generate([r])[0]["token_ids"] and len(calls.tokens[k]) == 6, k
    assert not engine.batcher.busy()


def test_a_huge_budget_prefills_the_whole_burst_at_once(tiny_model, runs):
    engine = _engine(tiny_model, runs, deployment={"prefill_tokens": 10**6})
    calls = _Calls()
    for j, p in enumerate(PROMPTS):
        engine.submit(_req(engine, p * (j + 1), max_tokens=4), calls.finish(str(j)))
    _steps(engine, calls, 1)
    assert len(engine.batcher.rows) + len(calls.done) == len(PROMPTS) and not engine.batcher.waiting
    _steps(engine, calls)


def test_the_cache_decodes_in_place_through_growth_joins_and_retires(engine):
    """The batcher's cache layer writes each step's column into spare room (no copy of the cache) and grows when
    full; after many steps, a join (both caches left-padded and concatenated) and a retire (a row and the leading
    padding cut), every row still gets the tokens it gets alone."""
    eos = min(engine.eos_ids)
    long = _req(engine, PROMPTS[0] * 3, "ad-a", max_tokens=60, logit_bias={eos: -100.0})
    short = _req(engine, PROMPTS[5] * 8, None, max_tokens=5, logit_bias={eos: -100.0})  # a wider prompt, ends soon
    late = _req(engine, PROMPTS[1], "ad-b", max_tokens=20, logit_bias={eos: -100.0})
    calls = _Calls()
    engine.submit(long, calls.finish("long"))
    _steps(engine, calls, 1)
    layer = engine.batcher.cache.layers[0]
    moved = 0
    for _ in range(30):
        before = (layer._k.data_ptr(), layer._k.shape[-2])
        _steps(engine, calls, 1)
        assert layer.keys.shape[-2] == engine.batcher.mask.shape[1]  # a view of exactly the columns fed
        moved += layer._k.data_ptr() != before[0]
        assert layer._k.data_ptr() == before[0] or layer.keys.shape[-2] > before[1]  # a new buffer only when full
    assert 0 < moved <= 4  # grown a few times in 30 steps, not copied at each
    engine.submit(short, calls.finish("short"))
    engine.submit(late, calls.finish("late"))
    _steps(engine, calls)
    for k, r in (("long", long), ("short", short), ("late", late)):
        assert calls.done[k]["token_ids"] == engine.generate([r])[0]["token_ids"], k
    assert len(calls.done["long"]["token_ids"]) == 60 and calls.at["short"] < calls.at["late"] < calls.at["long"]


def test_a_shared_prompt_prefix_is_kept_per_adapter_and_later_rows_prefill_only_the_rest(tiny_model, runs):
    """Prefix caching (ftray/serve/prefixes.py): prompts that share a preamble of >= 16 tokens, on the base and on
    an adapter. The first group computes it in full and keeps the preamble's keys and values per adapter from its
    rows' own prefill (no forward of its own); a later request prefills only what follows it, a longer shared
    prefix is kept once for the two rows that share it, and an adapter's entries go with its weights. Every answer
    is the one an engine without the cache gives."""
    from ftray.serve.prefixes import MIN_TOKENS

    engine = _engine(tiny_model, runs)
    plain = _engine(tiny_model, runs, deployment={"prefix_cache_tokens": 0})
    assert plain.batcher.prefixes is None
    unit = engine.tokenizer("1+1=", add_special_tokens=False)["input_ids"]
    pre = [engine.tokenizer.bos_token_id] + unit * (MIN_TOKENS // len(unit) + 1)

    def req(tail: str, adapter: str | None) -> dict:
        ids = pre + engine.tokenizer(tail, add_special_tokens=False)["input_ids"]
        return {"adapter": adapter, "input_ids": ids, "max_tokens": 8, "temperature": 0.0}

    def same(reqs: list[dict], got: list[dict]) -> None:
        for r, out in zip(reqs, got, strict=True):
            assert out["token_ids"] == plain.generate([r])[0]["token_ids"] and len(out["token_ids"]) > 0, r

    fed: list[tuple[int, int]] = []  # (rows, tokens fed) per forward with more than one token: the prefills
    forward = engine.forward

    def counting(names, **kw):
        if kw["input_ids"].shape[1] > 1:
            fed.append(tuple(kw["input_ids"].shape))
        return forward(names, **kw)

    engine.forward = counting
    first = [req(p, a) for p in ("12+7=", "3+4=", "7+8=") for a in (None, "ad-a")]  # tails that differ at once
    same(first, engine.generate(first))
    prefixes = engine.batcher.prefixes
    assert fed == [(len(first), max(len(r["input_ids"]) for r in first))] and prefixes.hits == 0
    assert sorted((str(a), ids) for a, ids in prefixes.entries) == [("None", tuple(pre)), ("ad-a", tuple(pre))]

    fed.clear()
    late = [req("99+1=", "ad-a")]
    same(late, engine.generate(late))
    assert fed == [(1, len(late[0]["input_ids"]) - len(pre))] and prefixes.hits == 1 and prefixes.saved == len(pre)
    assert len(prefixes.entries) == 2  # a hit learns nothing new

    fed.clear()
    longer = [req("12+7=" * 6 + t, None) for t in ("7", "8")]  # the preamble and 6 more sums in common
    same(longer, engine.generate(longer))
    grown = len(os.path.commonprefix([r["input_ids"] for r in longer]))
    assert grown - len(pre) >= MIN_TOKENS and fed == [(2, len(longer[0]["input_ids"]) - len(pre))]
    assert (None, tuple(longer[0]["input_ids"][:grown])) in prefixes.entries and len(prefixes.entries) == 3
    fed.clear()
    third = [req("12+7=" * 6 + "9+9", None)]
    same(third, engine.generate(third))
    assert fed == [(1, len(third[0]["input_ids"]) - grown)]  # from the longer entry

    engine.release("ad-a")
    engine.ensure_loaded({"ad-b"})  # ad-a's weights are deleted: so are its prefixes
    assert "ad-a" not in engine.loaded and {a for a, _ in prefixes.entries} == {None}


def test_the_replicas_loop_admits_a_stream_that_arrives_during_a_step_at_the_next_step(engine):
    """`Generator._steps` runs the batch on the replica's event loop, and a step holds the loop: a stream that
    arrives meanwhile gets in only through the yields between steps (its task starts in one loop iteration and
    submits in a later one). Here a second stream's task is made while the first stream decodes: its first token
    comes from the first step after it, not a step or more later. Without Ray: `Generator`'s own class, its
    `stream` and `_steps` on this test's event loop."""
    import asyncio

    from ftray.serve.deployments import Generator

    eos = min(engine.eos_ids)
    gen = object.__new__(Generator.func_or_class)
    gen.engine, gen._lock, gen._driver, gen.replica = engine, asyncio.Lock(), None, "r"
    steps = [0]
    step = engine.batcher.step

    def counted() -> None:
        step()
        steps[0] += 1

    engine.batcher.step = counted
    got: dict[str, list[int]] = {}  # the step count at each token

    async def consume(key: str, req: dict) -> None:
        async for item in gen.stream(req):
            if "token_ids" in item:
                got.setdefault(key, []).append(steps[0])

    async def main() -> int:
        first = asyncio.create_task(consume("first", _req(engine, PROMPTS[0], None, max_tokens=12, logit_bias={eos: -100.0})))
        while steps[0] < 3:
            await asyncio.sleep(0)
        at = steps[0]
        second = asyncio.create_task(consume("second", _req(engine, PROMPTS[1], None, max_tokens=4, logit_bias={eos: -100.0})))
        await asyncio.gather(first, second)
        return at

    try:
        at = asyncio.run(main())
    finally:
        del engine.batcher.step
    assert len(got["first"]) == 12 and len(got["second"]) == 4
    assert got["second"][0] == at + 1, (at, got)
