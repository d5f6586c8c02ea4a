"""Serving load test: requests/s, generated tokens/s, p50/p99 latency at several concurrencies.

Compares (a) dynamic batching, (b) one request at a time (max_batch_size 1), (c) 8 adapters mixed in
the traffic vs 1 adapter, all against a tiny model on CPU (`small`, 32 new tokens by default); `--kill-replica` kills the generator's
replica mid-run and reports how many requests failed and for how long Serve took to replace it.

    python benchmarks/serve_load.py                       # full: concurrency 1,4,16,32, 20 s per cell, then the drill
    python benchmarks/serve_load.py --quick               # 5 s per cell (~4 min on 2 cores)
    python benchmarks/serve_load.py --kill-replica        # the failure drill only

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
    a = ap.parse_args()
    if a.quick:
        a.seconds = 5.0
    conc = [int(x) for x in a.concurrency.split(",")]

    import ray
    from ray import serve

    from tests.conftest import free_port

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


if __name__ == "__main__":
    main()
