"""ASHA against every trial to full budget, on the same search space.

    python benchmarks/tune_asha.py [--samples 12] [--steps 24] [--out DIR]

The search space is learning rate (log-uniform) x LoRA rank on the tiny SFT job (nano Llama built from a
config, the arithmetic task, 2 Ray Train workers per trial, one trial at a time). Both arms draw the
same configurations (same search seed, same space, same order); arm (a) lets ASHA stop losing trials,
arm (b) runs every trial to `--steps`. Reported: total optimizer steps, wall time, and whether (a)
found (b)'s best configuration, or one within 1 % of its metric. Goal: (a) <= 40 % of (b)'s steps.
The table goes to stdout and to benchmarks/results/tune_asha.md; the two sweep.png figures beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--reduction-factor", type=float, default=3.0)
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--out", default=None, help="work folder (default: a temp folder, removed at the end)")
    args = ap.parse_args()
    t_all, load0 = time.time(), os.getloadavg()

    import ray

    from benchmarks._cli import stamp
    from ftray.data.synthetic import write_arithmetic
    from ftray.models.tiny import build_tiny
    from ftray.tune import run_sweep, sweep_from_dict

    work = Path(args.out or tempfile.mkdtemp(prefix="ftray-tune-bench-"))
    train, test = write_arithmetic(work / "arith")
    model = build_tiny(work / "tiny-nano", size="nano", corpus=[str(train)])
    ray.init(num_cpus=args.cpus, include_dashboard=True, configure_logging=False)
    base = {
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(test), "format": "prompt_completion", "max_length": 64,
                 "cache_dir": str(work / "cache")},
        "method": {"kind": "sft"},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"lr": 1e-3, "max_steps": args.steps, "global_batch_size": 8, "micro_batch_size": 4,
                  "eval_every": args.eval_every, "log_every": args.eval_every, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1.0},
        "output": {"dir": str(work / "unused")},
    }
    arms = {}
    for arm, scheduler in (("asha", {"kind": "asha", "grace_period": args.eval_every,
                                     "reduction_factor": args.reduction_factor}),
                           ("full", {"kind": "none"})):
        sweep, jobs = sweep_from_dict({
            "name": f"bench-{arm}",
            "base": base,
            "search": {"train.lr": {"loguniform": [3e-4, 3e-2]}, "adapter.r": {"choice": [2, 4, 8]}},
            "metric": "eval/eval_loss",
            "mode": "min",
            "scheduler": scheduler,
            "num_samples": args.samples,
            "max_concurrent_trials": 1,
            "seed": 0,
            "output": {"dir": str(work / arm)},
        })
        t0 = time.time()
        s = run_sweep(sweep, jobs)
        s["wall_s"] = time.time() - t0
        arms[arm] = s
    ray.shutdown()

    a, b = arms["asha"], arms["full"]
    full_by_params = {tuple(sorted(r["params"].items())): r["metric"] for r in b["rows"]}
    a_best_full = full_by_params.get(tuple(sorted(a["best_params"].items())))
    same = a["best_params"] == b["best_params"]
    within = a_best_full is not None and abs(a_best_full - b["best_metric"]) <= 0.01 * abs(b["best_metric"])
    share = a["total_steps"] / max(b["total_steps"], 1)
    fmt = lambda p: ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())  # noqa: E731
    lines = [
        "# Tune: ASHA vs every trial to full budget",
        "",
        f"Written by {stamp(t_all, load0)}.",
        "",
        f"{args.samples} trials (lr log-uniform [3e-4, 3e-2] x LoRA r in {{2, 4, 8}}), nano Llama, arithmetic SFT, "
        f"{args.steps} steps per full trial, eval every {args.eval_every}, 2 Ray Train workers per trial, "
        f"1 trial at a time, {args.cpus} logical CPUs; metric eval/eval_loss (min).",
        "",
        "| arm | trials | stopped early | total steps | wall s | best config | best eval_loss |",
        "|---|---|---|---|---|---|---|",
        f"| (a) ASHA (rf {args.reduction_factor:g}) | {a['trials']} | {a['stopped_early']} | {a['total_steps']} | "
        f"{a['wall_s']:.0f} | {fmt(a['best_params'])} | {a['best_metric']:.4f} |",
        f"| (b) full budget | {b['trials']} | {b['stopped_early']} | {b['total_steps']} | {b['wall_s']:.0f} | "
        f"{fmt(b['best_params'])} | {b['best_metric']:.4f} |",
        "",
        f"ASHA used {100 * share:.0f} % of the full-budget steps (goal <= 40 %: {'met' if share <= 0.4 else 'MISSED'}) and "
        f"{100 * a['wall_s'] / b['wall_s']:.0f} % of its wall time. Same winner: {'yes' if same else 'no'}"
        + ("" if same else f"; ASHA's winner scored {a_best_full:.4f} at full budget "
           f"({'within' if within else 'NOT within'} 1 % of {b['best_metric']:.4f})") + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_asha.md").write_text(text)
    for arm in arms:
        shutil.copy(work / arm / "sweep.png", RESULTS / f"tune_asha_{arm}.png")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
