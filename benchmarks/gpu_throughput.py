"""Training throughput on one NVIDIA GPU: ftray's loop in process against TRL's SFTTrainer and a plain loop.

The GPU counterpart of benchmarks/train_throughput.py (its data, order, collate and arms' code), for a GPU
machine where Ray need not be installed: ftray runs `ftray.train.local.run_local` (the same loop, data shards
and DeepSpeed engine as a Ray Train worker, world size 1). SmolLM2-135M-Instruct (or the tiny Llama `small`),
full fine-tuning or the shared LoRA, gpteacher code packed into rows of --seq-len tokens.

  ftray          run_local: scaling.use_gpu, DeepSpeed bf16 (bf16 weights, fp32 master copy in DeepSpeed's
                 bf16 optimizer), ZeRO --zero, packing and `train.group_by_length` on
  plain-torch    a plain loop over exactly ftray's batches (same shards, same grouped order, ftray's collate
                 and loss), fp32 weights under bf16 autocast, torch.optim.AdamW
  trl-packed     TRL SFTTrainer, bf16=True, bfd packing at --seq-len, --micro-batch packed rows flattened into
                 one padding-free row per forward (TRL's way), activation checkpointing off
  trl-packed-mb1 the same with one packed row per forward (--global-batch accumulated)

Equal work: the same model, examples, sequence length, sequences per optimizer step, optimizer and clip. The
attention differs in shape, said plainly: ftray and the plain loop run --micro-batch rows of --seq-len
(each row's examples masked apart); trl-packed one flattened row of micro x seq-len tokens (its examples
apart through position ids only where the attention kernel reads them); trl-packed-mb1 one row of seq-len.
Every arm skips its first --warmup steps. Ratios on the wall clock of the steps (GPU synchronised).

  python benchmarks/gpu_throughput.py --model smollm2 --steps 30
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import train_throughput as tt  # noqa: E402 - the shared arms and constants

RESULTS = ROOT / "benchmarks" / "results" / "gpu_throughput.md"
ARMS = ("ftray", "plain-torch", "trl-packed", "trl-packed-mb1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2")
    ap.add_argument("--adapter", choices=("full", "lora"), default="full")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script's plumbing")
    ap.add_argument("--out", default=None, help=f"default {RESULTS.relative_to(ROOT)} (with _MODEL_ADAPTER unless smollm2 full)")
    a = ap.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    if bad := [x for x in arms if x not in ARMS]:
        ap.error(f"unknown arm(s) {bad}; choose from {ARMS}")
    if a.global_batch % a.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    if not tt.DATA.exists():
        print(f"gpu_throughput: the benchmark data is absent: {tt.DATA}", file=sys.stderr)
        return 2
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device here (this benchmark is for a GPU machine)", file=sys.stderr)
        return 2
    # The shared arms read these module constants.
    tt.SEQ_LEN, tt.MICRO_BATCH, tt.GLOBAL_BATCH, tt.WARMUP = a.seq_len, a.micro_batch, a.global_batch, a.warmup

    from benchmarks._cli import count_params, stamp
    from ftray.models.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="ftray-gpu-bench-"))
    t_all, load_all = time.time(), os.getloadavg()
    rounds: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    try:
        if a.model == "smollm2":
            from ftray.models.real import get_model

            model = work / "model"
            get_model(tt.SMOLLM2, str(model))
            name = "SmolLM2-135M-Instruct"
            described = f"{name} ({count_params(model) / 1e6:.1f}M parameters, pre-trained; Q4_1 GGUF dequantized)"
        else:
            model = build_tiny(work / "model", size="small", corpus=[str(tt.DATA)])
            name = "Tiny Llama `small`"
            described = f"{name} ({count_params(model) / 1e6:.1f}M parameters, random init)"
        runs = {
            "ftray": lambda r: tt.run_ftray_inprocess(model, work, a.steps, a.adapter, a.zero, f"-r{r}", a.device == "cuda"),
            "plain-torch": lambda r: tt.run_plain(model, rounds["ftray"][0]["prepared"] if "ftray" in rounds else None,
                                                  a.steps, a.adapter, device=a.device),
            "trl-packed": lambda r: tt.run_trl(model, work, a.steps, a.adapter, micro=a.micro_batch, device=a.device),
            "trl-packed-mb1": lambda r: tt.run_trl(model, work, a.steps, a.adapter, micro=1, device=a.device),
        }
        for rnd in range(a.rounds):
            order = [x for x in ARMS if x in arms]
            if rnd % 2:
                order = order[:1] + order[1:][::-1]  # ftray first (its shards feed the plain loop), the rest reversed
            for arm in order:
                tt.log(f"--- {arm} (round {rnd + 1})")
                t0 = time.time()
                try:
                    if a.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    res = runs[arm](rnd)
                    if a.device == "cuda":
                        res["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                        torch.cuda.empty_cache()
                    rounds.setdefault(arm, []).append(res)
                    tt.log(f"{arm}: {res['tokens_per_s']:,.0f} trained tokens/s ({time.time() - t0:.0f} s)")
                except Exception as e:
                    errors[arm] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    tt.log(f"{arm} FAILED: {errors[arm]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = tt.over_rounds(rounds)
    base = results.get("ftray")
    rows = [
        "| arm | trained tokens/s (in steps) | ratio ftray / arm | tokens/s incl. between-step work | median step tokens/s "
        "| s/step | steps measured | padding | peak GPU memory | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        if arm in errors and arm not in results:
            rows.append(f"| {arm} | failed: {errors[arm]} | | | | | | | | |")
        if arm not in results:
            continue
        r = results[arm]
        ratio = f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}" if base else "n/a"
        rows.append(
            f"| {arm} | {r['tokens_per_s']:,.0f} | {ratio} | {r.get('loop_tokens_per_s', r['tokens_per_s']):,.0f} | "
            f"{r['median_tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | {r['steps']} | {100 * r['padding']:.1f} % | "
            f"{r.get('peak_mib', float('nan')):,.0f} MiB | {r['final_loss']:.3f} |"
        )
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "none (plumbing run on CPU)"
    notes = [f"- {arm}: {r['note']}" for arm, r in results.items()]
    notes += [f"- {arm} per round (tokens/s): {' / '.join(f'{x:,.0f}' for x in r['per_round'])}"
              for arm, r in results.items() if a.rounds > 1]
    if base:
        for arm in ("plain-torch", "trl-packed", "trl-packed-mb1"):
            if arm in results:
                notes.append(f"- ftray / {arm} in the steps: {base['tokens_per_s'] / results[arm]['tokens_per_s']:.2f}")
    md = [
        f"# Training throughput on one GPU: ftray in process vs TRL SFTTrainer vs a plain loop ({name}, {a.adapter})",
        "",
        stamp(t_all, load_all) + f", {platform.machine()}, GPU: {gpu}",
        "",
        f"{described}, {'LoRA ' + str(tt.LORA) if a.adapter == 'lora' else 'full fine-tuning'}, bf16, AdamW lr {tt.LR} "
        f"constant, clip 1.0; gpteacher_code_train (chat template, loss on answers), packed to {a.seq_len} tokens; "
        f"{a.global_batch} sequences per optimizer step, {a.micro_batch} per forward pass; {a.steps} steps per arm, "
        f"first {a.warmup} excluded; {a.rounds} round(s), medians. Versions: {tt.versions()}.",
        "",
        *rows,
        "",
        *notes,
        *(f"- {arm} failed: {e}" for arm, e in errors.items()),
        "",
    ]
    print("\n".join(md))
    default = RESULTS if (a.model, a.adapter) == ("smollm2", "full") else RESULTS.with_name(
        f"{RESULTS.stem}_{a.model}_{a.adapter}.md")
    out = Path(a.out) if a.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    tt.log(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
