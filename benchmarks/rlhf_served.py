"""RLHF against a served reward model, end to end on the quickstart's arithmetic:

1. warm start: a tiny Llama SFT'd briefly on the task, merged (shared with benchmarks/grpo_arith.py);
2. `reward` (jobs/reward_arith.yaml): a reward model learns from preference pairs (the right sum chosen over
   wrong answers: a near miss, a far-off number, a malformed answer), started from the SFT'd policy;
   held-out pairwise accuracy before/after;
3. `grpo` (jobs/grpo_arith.yaml with `rewards: {}` and `reward_model: {path: <the reward run>}`) and `ppo`
   (jobs/ppo_arith.yaml): the job deploys the reward run as a Ray Serve app and every rollout is scored
   through its deployment handle. Held-out prompts are judged by the served model's mean score (greedy
   answers) and exact match before and after; the per-step KL to the reference is compared with its bound
   (ppo: the adaptive controller's `kl_target`).

    python benchmarks/rlhf_served.py [--sft-steps 60] [--steps 100] [--work runs/bench-grpo]

Every run is `ftray ...` as a user types it. Results: benchmarks/results/rlhf_served.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ROOT, done, ftray, record, stamp  # noqa: E402


def steps(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if '"train/kl"' in x]


def sets(over: dict) -> list[str]:
    return [x for k, v in over.items() for x in ("--set", f"{k}={v}")]


# Looser KL control than the shipped settings: (method, --set overrides).
LOOSE = [
    ("grpo", {"method.beta": 0.04, "train.lr": 2e-3}),
    ("grpo", {"method.beta": 0.2, "train.lr": 2e-3}),
    ("ppo", {"method.kl_coef": 0.05, "method.kl_target": 0.1, "method.kl_horizon": 10000, "train.lr": 1e-3}),
    ("ppo", {"method.kl_coef": 0.2, "method.kl_target": 0.5, "method.kl_horizon": 1000, "train.lr": 5e-4}),
]


def row(name: str, run: Path, wall: float) -> str:
    """One table row from a policy run's run.json and metrics: served score and exact match before/after, the
    step KL at the start and the end and at most, the KL setting, the wall seconds."""
    rec = record(run)
    b, af = rec["eval"]["before"], rec["eval"]["after"]
    hist = steps(run)
    k = max(1, len(hist) // 10)
    kl_first = sum(s["train/kl"] for s in hist[:k]) / k
    kl_last = sum(s["train/kl"] for s in hist[-k:]) / k
    kl_max = max(s["train/kl"] for s in hist)
    m = rec["spec"]["method"]
    bound = (f"kl_target {m['kl_target']} (adaptive; coef {m['kl_coef']} -> {hist[-1].get('train/kl_coef', float('nan')):.3f})"
             if name == "ppo" else f"k3 penalty, beta {m['beta']} (no hard bound)")
    return (f"| {name} | {b['reward_model_score']:.3f} | {af['reward_model_score']:.3f} | {b['exact_match']:.3f} | "
            f"{af['exact_match']:.3f} | {kl_first:.4f} -> {kl_last:.4f} | {kl_max:.4f} | {bound} | {wall:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--rm-steps", type=int, default=120)
    ap.add_argument("--steps", type=int, default=100, help="grpo and ppo steps")
    ap.add_argument("--grpo-beta", type=float, default=1.0, help="grpo's KL weight against the learned reward")
    ap.add_argument("--grpo-lr", type=float, default=3e-4)
    ap.add_argument("--no-loose", dest="loose", action="store_false",
                    help="skip the runs with weaker KL control (LOOSE), whose table shows the learned reward gamed")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-grpo"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rlhf_served.md"))
    a = ap.parse_args(argv)
    w = Path(a.work)
    data, model, sft = w / "data", w / "tiny-micro", w / "sft"
    t0, load0 = time.time(), os.getloadavg()
    if not (data / "arith_pref_train.jsonl").exists():
        ftray("data", "arithmetic", str(data), "--preferences")
    if not (model / "config.json").exists():
        ftray("models", "tiny", str(model), "--size", "micro", "--corpus", str(data / "arith_train.jsonl"))
    if not done(sft):
        ftray("train", "jobs/quickstart_tiny.yaml", *sets({
            "model.path": model, "data.train": data / "arith_train.jsonl", "data.eval": data / "arith_test.jsonl",
            "train.max_steps": a.sft_steps, "train.eval_every": "null", "train.checkpoint_every": "null",
            "output.dir": sft}))
    if not (sft / "merged" / ".complete").exists():
        ftray("export", str(sft), "--merge")

    rm = w / "rm"
    if not done(rm):
        ftray("train", "jobs/reward_arith.yaml", *sets({
            "model.path": sft / "merged", "data.train": data / "arith_pref_train.jsonl",
            "data.eval": data / "arith_pref_test.jsonl", "train.max_steps": a.rm_steps, "output.dir": rm}))
    t = {"reward": record(rm)["timings"]["total_s"]}

    served = {"path": str(rm), "app": "ftray-reward", "scorer": "rm", "num_cpus": 0.5}
    paths = {"model.path": sft / "merged", "data.train": data / "arith_train.jsonl",
             "data.eval": data / "arith_test.jsonl", "train.max_steps": a.steps}
    g_job = yaml.safe_load((ROOT / "jobs" / "grpo_arith.yaml").read_text())
    # A learned reward can be gamed (the policy drifts to what the reward model over-rates): a stronger KL
    # penalty than the verifiable-reward job's beta 0.04 keeps the policy near the SFT model.
    g_job["method"].update(rewards={}, reward_model=served, beta=a.grpo_beta)
    g_job["scaling"]["cpus_per_worker"] = 0.75
    g_job["train"].update(eval_every=a.steps // 2, log_every=10, lr=a.grpo_lr)
    (w / "grpo_served.yaml").write_text(yaml.safe_dump(g_job, sort_keys=False))
    runs = {"grpo": w / "grpo-served", "ppo": w / "ppo-served"}
    t["grpo"] = ftray("train", str(w / "grpo_served.yaml"), *sets({**paths, "output.dir": runs["grpo"]}))
    t["ppo"] = ftray("train", "jobs/ppo_arith.yaml", *sets({**paths, "output.dir": runs["ppo"],
                                                             "method.reward_model.path": rm}))

    loose = {}
    for i, (name, over) in enumerate(LOOSE if a.loose else ()):
        run = w / f"{name}-loose-{i}"
        job = str(w / "grpo_served.yaml") if name == "grpo" else "jobs/ppo_arith.yaml"
        extra = {} if name == "grpo" else {"method.reward_model.path": rm}
        t[run.name] = ftray("train", job, *sets({**paths, **extra, **over, "output.dir": run}))
        loose[run.name] = (name, run, over)

    r = record(rm)
    rb, ra = r["eval"]["before"], r["eval"]["after"]
    md = [
        "# RLHF against a served reward model (arithmetic)",
        "",
        stamp(t0, load0),
        "",
        f"Tiny Llama `micro`, SFT warm start of {a.sft_steps} steps, merged. Reward model: `jobs/reward_arith.yaml` "
        f"(full fine-tune from the SFT model, {a.rm_steps} steps, "
        f"{len((data / 'arith_pref_train.jsonl').read_text().splitlines())} train pairs: the right sum over a near "
        f"miss, a far-off number or a malformed answer); held-out pairwise accuracy {rb['accuracy']:.3f} -> {ra['accuracy']:.3f} on "
        f"{len((data / 'arith_pref_test.jsonl').read_text().splitlines())} pairs over unseen sums ({t['reward']:.0f} s).",
        "",
        "Policies (2 Ray Train workers, ZeRO-2, LoRA, from the SFT model): each job deploys the reward run as the "
        "Serve app `ftray-reward` and scores every rollout through its deployment handle; no verifiable reward "
        "(`rewards: {}`). Held-out: the 60 unseen sums, greedy answers scored by the served model.",
        "",
        "| method | served score before | after | exact match before | after | mean KL first 10 % -> last 10 % | "
        "max step KL | KL bound | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    md += [row(name, run, t[name]) for name, run in runs.items()]
    if loose:
        md += [
            "",
            "## Weaker KL control: the learned reward is gamed",
            "",
            "The same reward model and warm start, with looser settings (each row's changes from the table "
            "above in its last column). Where the served score climbs higher while exact match falls and the KL "
            "runs away, the policy has drifted to answers the reward model over-rates.",
            "",
            "| method | served score before | after | exact match before | after | mean KL first 10 % -> last 10 % | "
            "max step KL | KL bound | wall s | changed |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        md += [row(name, run, t[key]) + f" {', '.join(f'`{k}` {v:g}' for k, v in over.items())} |"
               for key, (name, run, over) in loose.items()]
    md.append("")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
