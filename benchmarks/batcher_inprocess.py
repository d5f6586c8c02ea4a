"""The continuous batcher in process (no Ray, no HTTP) on SmolLM2-135M-Instruct: one prefill for all waiting
requests (git main's scheduling: `prefill_tokens` too large to bind) against prefill in token-budgeted groups
(ftray/serve/batcher.py), arms interleaved in one process on the same requests, and each prefill size's
tokens/s (what the default `deployment.prefill_tokens` is chosen from).

    python benchmarks/batcher_inprocess.py                  # concurrency 16, 20 requests, 3 arms (and the first again)
    python benchmarks/batcher_inprocess.py --arms old/dynamic,256/roomy,512/roomy --order 0,1,2,0
    python benchmarks/batcher_inprocess.py --arms 512/roomy/0,512/roomy/2,512/roomy/inf --order 0,1,2,2,1,0 \
        --seed 1 --requests 24 --out benchmarks/results/batcher_pause.md
    python benchmarks/batcher_inprocess.py --threads 2 --requests 32 --arms 512/roomy/2/0,512/roomy/2/4096 \
        --order 0,1,1,0,0,1 --decode '' --rates '' --out benchmarks/results/batcher_prefix.md
    python benchmarks/batcher_inprocess.py --threads 2 --requests 32 --system-tokens 400 \
        --arms 512/roomy/2/0,512/roomy/2/4096 --order 0,1,1,0 --decode '' --rates '' \
        --out benchmarks/results/batcher_prefix_system400.md

An arm is PREFILL_TOKENS/LAYER[/PAUSE[/PREFIX]]: `old` (one prefill for all waiting, the first batcher's scheduling) or a
token budget; the cache layer: `dynamic` (transformers' DynamicLayer: `torch.cat` of the whole cache every step)
or `roomy` (the batcher's layer with room to decode in place); `deployment.prefill_pause_s` (default 0: a
decoding step after every prefill group; `inf`: prefill first until none waits); `deployment.prefix_cache_tokens`
(default 0: no prefix cache; each run starts with an empty one).

Requests: `benchmarks/serve_load.py --real`'s list (`--seed`, default 0, the list serve_load reports on), each rendered with the chat template as the server
does, greedy, EOS banned by `logit_bias` (so each generates exactly its `max_tokens`), streamed (`emit`): c are
submitted at once and each one that ends submits the next (closed loop; every arm the same requests, unless
`--seconds` stops sending); the batch steps
in this thread (as `Generator._steps` does on the replica's loop). Time to first token: submit to first emitted
token; time per output token: (last - first) / (tokens - 1). Results to `--out` (default
benchmarks/results/batcher_inprocess.md); ratios are to the first arm of `--arms`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD = 10**9  # a budget no burst reaches: every waiting request in one prefill, as before groups
THREADS_NOTE = (" (fewer than the server's 2: with other work on the 2 cores, 2 OpenMP threads per forward stall each"
                " other)")


def shared_system(tok, n: int) -> str:
    """A system prompt of about `n` tokens that every request shares (as an app's instructions or a few-shot preamble):
    serve_load's note sentences in a fixed order."""
    from benchmarks.serve_load import _NOTES

    text, k = "You answer questions about the town's records. Facts you may use:", 0
    while len(tok(text, add_special_tokens=False)["input_ids"]) < n:
        text += " " + _NOTES[k % len(_NOTES)]
        k += 1
    return text


def prefill_rates(engine, sizes: list[tuple[int, int]], repeats: int = 3) -> list[dict]:
    """Tokens/s of one prefill of `rows` x `width` tokens (no padding), median of `repeats`."""
    import torch
    from transformers import DynamicCache

    out = []
    for rows, width in sizes:
        ids = torch.randint(100, 20000, (rows, width), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.forward([None] * rows, input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(1) - 1,
                           past_key_values=DynamicCache(config=engine.model.config), use_cache=True, logits_to_keep=1)
            ts.append(time.perf_counter() - t0)
        s = statistics.median(ts)
        out.append({"rows": rows, "width": width, "tokens": rows * width, "s": s, "tok_s": rows * width / s})
        print(out[-1], flush=True)
    return out


def decode_steps(engine, rows: int, width: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per decoding step of `rows` rows over a cache of `width` columns (random keys and values), with
    transformers' DynamicLayer (`torch.cat` of the whole cache per step) and with the batcher's `_RoomyLayer`
    (written in place), interleaved `repeats` times; each time the mean over `steps` steps."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from ftray.serve.batcher import _RoomyLayer

    cfg = engine.model.config
    heads, dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out: dict[str, list[float]] = {"dynamic": [], "roomy": []}
    for _ in range(repeats):
        for name, layer_cls in (("dynamic", DynamicLayer), ("roomy", _RoomyLayer)):
            cache = DynamicCache(config=cfg)
            cache.layers = [layer_cls() for _ in cache.layers]
            g = torch.Generator().manual_seed(0)
            for layer in cache.layers:
                k, v = (torch.randn(rows, heads, width, dim, generator=g) for _ in range(2))
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            mask = torch.ones(rows, width, dtype=torch.long)
            ids = torch.full((rows, 1), 100)
            t0 = time.perf_counter()
            for i in range(steps):
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                engine.forward([None] * rows, input_ids=ids, attention_mask=mask, position_ids=torch.full((rows, 1), width + i),
                               past_key_values=cache, use_cache=True)
            out[name].append((time.perf_counter() - t0) / steps)
        print({k: v[-1] for k, v in out.items()}, flush=True)
    return out


def closed_loop(engine, reqs: list[dict], concurrency: int, seconds: float | None) -> dict:
    """Run `reqs` (in order) `concurrency` at a time through `engine.submit` + `batcher.step()`."""
    from benchmarks.serve_load import _pct

    todo = iter(reqs)
    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    count: dict[int, int] = {}
    ended: list[int] = []
    t0 = time.perf_counter()

    def send() -> None:
        if seconds is not None and time.perf_counter() - t0 > seconds:
            return
        r = next(todo, None)
        if r is None:
            return
        k = len(sent)
        sent[k] = time.perf_counter()

        def emit(item: dict, k: int = k) -> None:
            now = time.perf_counter()
            first.setdefault(k, now)
            last[k] = now
            count[k] = count.get(k, 0) + len(item["token_ids"])

        def done(res: dict, k: int = k) -> None:
            if "error" in res:
                raise RuntimeError(res["error"])
            ended.append(k)
            send()

        engine.submit(r, done, emit)

    for _ in range(concurrency):
        send()
    steps = 0
    while engine.batcher.busy():
        engine.batcher.step()
        steps += 1
    wall = time.perf_counter() - t0
    ttft = [first[k] - sent[k] for k in ended]
    tpot = [(last[k] - first[k]) / (count[k] - 1) for k in ended if count[k] > 1]
    out = sum(count[k] for k in ended)
    return {"requests": len(ended), "out_tokens": out, "asked": sum(reqs[k]["max_tokens"] for k in ended),
            "prompt_mean": statistics.mean(len(reqs[k]["input_ids"]) for k in ended), "wall_s": wall,
            "steps": steps, "tok_s": out / wall, "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p95_ms": _pct(ttft, 0.95),
            "tpot_p50_ms": _pct(tpot, 0.5), "tpot_p95_ms": _pct(tpot, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", default=str(ROOT / "runs" / "smollm2"),
                    help="SmolLM2-135M-Instruct's folder (written by `ftray models get smollm2-135m-instruct`)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20, help="the first N requests of the list")
    ap.add_argument("--seconds", type=float, default=None, help="no request is submitted after this many seconds of an arm")
    ap.add_argument("--arms", default="old/dynamic,512/dynamic,512/roomy", help="PREFILL_TOKENS/LAYER[/PAUSE[/PREFIX]] per arm (see above)")
    ap.add_argument("--system-tokens", type=int, default=0,
                    help="give every request one shared system prompt of about this many tokens (0: the chat template's default)")
    ap.add_argument("--seed", type=int, default=0, help="the request list's seed (choose settings on another seed than the reported one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batcher_inprocess.md"))
    ap.add_argument("--order", default="0,1,2,0", help="arm indices in run order (repeats allowed)")
    ap.add_argument("--decode", default="16x400x20x3", help="decoding steps timed ROWSxWIDTHxSTEPSxREPEATS ('' skips)")
    ap.add_argument("--rates", default="1x64,1x128,2x128,2x256,4x256", help="prefill sizes ROWSxWIDTH to time ('' skips)")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer
    from transformers.cache_utils import DynamicLayer

    from benchmarks._cli import stamp
    from benchmarks.serve_load import real_requests
    from ftray.serve.batcher import _RoomyLayer
    from ftray.serve.config import Deployment, GenerationModel
    from ftray.serve.engine import LoraEngine
    from ftray.serve.prefixes import Prefixes

    t0, load0 = time.time(), os.getloadavg()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.smollm2)
    reqs = []
    system = shared_system(tok, a.system_tokens) if a.system_tokens else None
    for r in real_requests(a.requests, a.seed, 16, 128):
        msgs = ([{"role": "system", "content": system}] if system else []) + r["messages"]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        reqs.append({"adapter": None, "input_ids": tok(text, add_special_tokens=False)["input_ids"], "max_tokens": r["max_tokens"],
                     "temperature": 0.0, "logit_bias": {tok.eos_token_id: -100.0}, "stop": None})
    arms = [(OLD if p[0] == "old" else int(p[0]), p[1], float(p[2]) if len(p) > 2 else 0.0, int(p[3]) if len(p) > 3 else 0)
            for p in (x.split("/") for x in a.arms.split(","))]
    order = [int(x) for x in a.order.split(",")]
    engine = LoraEngine(GenerationModel(name="smollm2", base=a.smollm2, deployment=Deployment(max_batch_size=32, num_cpus=a.threads)),
                        device="cpu")
    rates = prefill_rates(engine, [tuple(int(v) for v in s.split("x")) for s in a.rates.split(",")]) if a.rates else []
    engine.generate([{**reqs[0], "max_tokens": 2}])  # warm-up
    dec = decode_steps(engine, *(int(v) for v in a.decode.split("x"))) if a.decode else None
    runs: dict[int, list[dict]] = {i: [] for i in range(len(arms))}
    for i in order:
        engine.batcher.prefill_tokens = arms[i][0]
        engine.batcher._layer = {"dynamic": DynamicLayer, "roomy": _RoomyLayer}[arms[i][1]]
        engine.batcher.pause_s = arms[i][2]
        engine.batcher.prefixes = Prefixes(arms[i][3]) if arms[i][3] else None  # each run starts cold
        r = closed_loop(engine, reqs, a.concurrency, a.seconds)
        r["from_cache"] = engine.batcher.prefixes.saved if engine.batcher.prefixes is not None else 0
        runs[i].append(r)
        print(arms[i], r, flush=True)
    write(a, arms, order, runs, rates, dec, reqs, stamp(t0, load0))


def write(a, arms, order, runs, rates, dec, reqs, stamped: str) -> None:
    def name(arm: tuple[int, str, float, int]) -> str:
        b, layer, pause, prefix = arm
        return ("one prefill for all" if b == OLD else f"groups of <= {b} tokens") + (
            ", DynamicLayer (torch.cat)" if layer == "dynamic" else ", cache with room (in place)") + (
            "" if not pause else ", prefill first" if pause == float("inf") else f", prefill first up to {pause:g} s") + (
            f", prefix cache {prefix} tokens" if prefix else "")

    lines = ["# The continuous batcher in process: how a burst is prefilled (SmolLM2-135M)", "", stamped, "",
             f"SmolLM2-135M-Instruct (`{a.smollm2}`), fp32, CPU, in process (no Ray, no HTTP). "
             f"Requests: `serve_load.py --real`'s list (seed {a.seed}, chat template"
             + (f" with one system prompt of ~{a.system_tokens} tokens shared by all (`--system-tokens`)" if a.system_tokens else "")
             + f", prompts {min(len(r['input_ids']) for r in reqs)}-"
             f"{max(len(r['input_ids']) for r in reqs)} tokens, `max_tokens` 16-128, greedy, EOS banned by `logit_bias`), streamed; "
             f"concurrency {a.concurrency}, closed loop over the first {a.requests}"
             + (f", none submitted after {a.seconds:g} s of an arm (those in flight finish and count)" if a.seconds else "")
             + f". Torch threads: {a.threads}{THREADS_NOTE if a.threads == 1 else ''}. Arms in this order, one process: {'; '.join(name(arms[i]) for i in order)}. "
             "Time to first token (TTFT): submit to first token; time per output token (TPOT): (last - first) / (tokens - 1); "
             "p50/p95 nearest rank. Noisy machine (shared): compare arms of this run only.", "",
             "| arm | run | requests | out/asked tokens | prompt tokens (mean) | prompt tokens from the prefix cache | steps | wall s | output tok/s | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | TPOT p95 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, arm in enumerate(arms):
        for k, r in enumerate(runs[i]):
            lines.append(f"| {name(arm)} | {k + 1} | {r['requests']} | {r['out_tokens']}/{r['asked']} | {r['prompt_mean']:.0f} | {r.get('from_cache', 0)} | {r['steps']} | "
                         f"{r['wall_s']:.1f} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['tpot_p50_ms']:.0f} | "
                         f"{r.get('tpot_p95_ms', float('nan')):.0f} |")
    if runs[0]:
        base = runs[0]
        lines += ["", f"Ratios to {name(arms[0])} (means over each arm's runs; output tok/s higher is better, the others lower):", ""]
        for i, arm in enumerate(arms):
            if i == 0 or not runs[i]:
                continue

            def mean(rs, key):
                return statistics.mean(r[key] for r in rs)

            lines.append(f"- {name(arm)}: output tok/s {mean(runs[i], 'tok_s') / mean(base, 'tok_s'):.2f}x, "
                         f"TTFT p50 {mean(runs[i], 'ttft_p50_ms') / mean(base, 'ttft_p50_ms'):.2f}x, "
                         f"TTFT p95 {mean(runs[i], 'ttft_p95_ms') / mean(base, 'ttft_p95_ms'):.2f}x, "
                         f"TPOT p50 {mean(runs[i], 'tpot_p50_ms') / mean(base, 'tpot_p50_ms'):.2f}x, "
                         f"TPOT p95 {mean(runs[i], 'tpot_p95_ms') / mean(base, 'tpot_p95_ms'):.2f}x")
    if dec:
        rows, width, steps, repeats = (int(v) for v in a.decode.split("x"))
        med = {k: statistics.median(v) for k, v in dec.items()}
        lines += ["", f"Decoding steps alone: {rows} rows over a cache of {width} columns (random keys and values), {steps} steps, "
                  f"the two cache layers interleaved {repeats} times; ms per step (each time's mean):", "",
                  "| cache layer | ms per step | median |", "|---|---|---|",
                  *(f"| {k} | {', '.join(f'{x * 1000:.0f}' for x in v)} | {med[k] * 1000:.0f} |" for k, v in dec.items()), "",
                  f"Room in place / DynamicLayer, median step time: {med['roomy'] / med['dynamic']:.2f}x."]
    if rates:
        lines += ["", "One prefill (no padding), median of 3: tokens/s by size (the budget is the smallest size at about the "
                  "largest rate: larger groups prefill no faster per token and only delay first tokens):", "",
                  "| rows x width | tokens | s | tokens/s |", "|---|---|---|---|"]
        lines += [f"| {r['rows']} x {r['width']} | {r['tokens']} | {r['s']:.2f} | {r['tok_s']:.0f} |" for r in rates]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]) + f"\n\nwrote {out}")


if __name__ == "__main__":
    main()
