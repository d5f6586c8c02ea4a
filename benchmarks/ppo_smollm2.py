"""`ppo` on SmolLM2-135M-Instruct against a served reward model (issue 15, item 5): the policy (LoRA) samples
replies to HH-RLHF harmless prompts; the `reward` run of benchmarks/real_feedback.py (SmolLM2 + a one-label head,
LoRA, merged) is deployed by the job as the Serve app `ftray-reward` and scores every rollout through its
deployment handle; adaptive KL control steers the per-reply KL to the untouched model towards `kl_target`.

    python benchmarks/real_feedback.py --arms lora-hh,lora-oasst     # the reward model and the second judge, first
    python benchmarks/ppo_smollm2.py [--steps 16] [--prompts 64] [--lock /tmp/ray.lock]

Judged on held-out prompts (the first `--prompts` of the HH test file, which neither the reward model nor the
policy trained on): the served reward model's mean score of greedy replies before and after (the job's own
evaluation), the KL per step against its target, and, so that reward hacking shows, the win rate of the policy's
greedy reply over the untouched model's judged twice: by the reward model it was trained against and by a second
reward model it was not trained against (`--judge`: the oasst1 `reward` run by default), beside the share that the longer reply would win and the
replies' mean length. One setting, fixed before the run (nothing is chosen on the held-out prompts). Writes
benchmarks/results/ppo_smollm2.md whole.
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
from _cli import ROOT, child, ftray, need_smollm2, one_piece, record, stamp, win_goal, win_rate  # noqa: E402

BASE = ROOT / "runs" / "smollm2"
WORK = ROOT / "runs" / "ppo-smollm2"
PREF = ROOT.parent / "shared" / "data" / "preference"
FEEDBACK = ROOT / "runs" / "real-feedback"
# The reward PPO maximises: the best HH harmless `reward` run (100 steps, left cut, held-out 0.656).
REWARD = FEEDBACK / "lora-hh-lr0.0005-s100-left-len256-seed0"
# A second judge the policy was not trained against: the oasst1 `reward` run where it is there, else `--judge`.
JUDGE = FEEDBACK / "lora-oasst-lr0.0005-s20-len256-seed0"
FEEDBACK_JSON = ROOT / "benchmarks" / "results" / "real_feedback.json"


def held_out(run: Path) -> dict:
    """The test-split figures benchmarks/real_feedback.py measured for a `reward` run folder."""
    saved = json.loads(FEEDBACK_JSON.read_text()) if FEEDBACK_JSON.exists() else {}
    got = [v for k, v in saved.items() if k.startswith("test/") and Path(v.get("run", "")).name == run.name]
    if not got:
        sys.exit(f"{run}: no held-out figure in {FEEDBACK_JSON.relative_to(ROOT)}; benchmarks/real_feedback.py measures it")
    return got[-1]


def chat_rows(src: Path, dst: Path, limit: int | None = None) -> int:
    """Preference rows -> chat rows (history, the prompt, the chosen reply as the reference answer)."""
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()][:limit]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps({"messages": [*r.get("history", []), {"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["chosen"]}]}) + "\n" for r in rows))
    return len(rows)


def job(a, train: Path, test: Path, out: Path) -> dict:
    return {
        "name": "ppo-hh-smollm2",
        "model": {"path": str(BASE)},
        "data": {"train": str(train), "eval": str(test), "format": "chat", "max_length": a.max_length},
        "method": {
            "kind": "ppo", "samples_per_prompt": 2, "max_new_tokens": a.new_tokens, "temperature": 0.7,
            "rewards": {},  # the served reward model only
            "reward_model": {"path": str(Path(a.reward) / "merged"), "app": "ftray-reward", "scorer": "rm", "num_cpus": 0.5},
            "kl_coef": 0.1, "kl_target": a.kl_target, "kl_horizon": 64, "vf_coef": 0.1,
        },
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "train": {"lr": a.lr, "max_steps": a.steps, "global_batch_size": 8, "micro_batch_size": 4, "warmup_steps": 0,
                  "log_every": 1, "checkpoint_every": 1000, "seed": 0},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1.5},  # + the reward replica's 0.5: the 2 CPUs
        "output": {"dir": str(out)},
    }


# ---- pieces, each in a fresh process ----

def generate_piece(run: str, data: str, out: str, prompts: str, tokens: str, max_length: str) -> dict:
    import real_feedback as rf

    a = argparse.Namespace(win_prompts=int(prompts), win_tokens=int(tokens), max_length=int(max_length))
    return rf.generate_one(run, data, out, a)


def judge_piece(judge: str, data: str, max_length: str) -> dict:
    import real_feedback as rf

    return rf.eval_one(judge, data, argparse.Namespace(seed=0, max_length=int(max_length)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=64, help="held-out HH test prompts")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=256, help="prompt + reply tokens (the prompt keeps its end)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-target", type=float, default=1.0, help="nats per reply")
    ap.add_argument("--lock", default=None, help="flock this file around each CPU-heavy piece")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ppo_smollm2.md"))
    ap.add_argument("--reward", default=str(REWARD), help="the `reward` run folder (merged) the job serves and PPO maximises")
    ap.add_argument("--judge", default=str(JUDGE), help="a second `reward` run folder that judges the win rate")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one_piece(a.one, {"generate": generate_piece, "judge": judge_piece})
        return 0
    need_smollm2(BASE)
    reward, judge = Path(a.reward).resolve(), Path(a.judge).resolve()
    for run in (reward, judge):
        if not (run / "merged" / "config.json").exists():
            sys.exit(f"{run}: missing; `python benchmarks/real_feedback.py --arms lora-hh,lora-oasst` trains it")
    acc = {name: held_out(run) for name, run in (("reward", reward), ("judge", judge))}
    t0, load0 = time.time(), os.getloadavg()
    data = WORK / "data"
    import real_feedback as rf

    fit, _ = rf.split("hh", 0)  # the reward model's training pairs (its validation split left out)
    n_train = chat_rows(fit, data / "hh_fit_chat.jsonl")
    test_pref = data / "hh_test_prompts.jsonl"
    test_pref.write_text("".join(x + "\n" for x in (PREF / "hh_rlhf_harmless_test.jsonl").read_text().splitlines()[: a.prompts]))
    chat_rows(test_pref, data / "hh_test_chat.jsonl")
    run = WORK / f"ppo-lr{a.lr:g}-s{a.steps}-kl{a.kl_target:g}-{reward.name}"
    spec = job(a, data / "hh_fit_chat.jsonl", data / "hh_test_chat.jsonl", run)
    (WORK / "ppo_hh.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    trained_here = not (run / "run.json").exists()  # a finished run is judged again, not trained again
    wall = ftray("train", str(WORK / "ppo_hh.yaml"), lock=a.lock) if trained_here else float("nan")
    rec = record(run)
    if not trained_here:
        wall = rec["timings"]["total_s"]  # the job's own clock: prepare + fit (deployment and evaluations inside)

    logs = WORK / "logs"
    replies = run / "replies.jsonl"  # chosen: the policy's greedy reply; rejected: the untouched model's
    gen = child(__file__, ["generate", str(run), str(test_pref), str(replies), str(a.prompts), str(a.new_tokens),
                           str(a.max_length)], [], a.lock, logs)
    judged = {name: child(__file__, ["judge", str(path), str(replies), str(a.max_length)], [], a.lock, logs)
              for name, path in (("hh", reward), ("oasst", judge))}

    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train/kl"' in x]
    kls = [h["train/kl"] for h in hist]
    k = max(1, len(kls) // 4)
    b, af = rec["eval"]["before"], rec["eval"]["after"]
    mean_kl = sum(kls) / len(kls)
    up = af["reward_model_score"] > b["reward_model_score"]
    goal = "**met**" if up and mean_kl <= a.kl_target else (
        "missed: " + "; ".join(x for x, bad in (("the served score did not rise", not up),
                                               (f"mean step KL {mean_kl:.3f} above the target", mean_kl > a.kl_target)) if bad))
    md = [
        "# `ppo` on SmolLM2-135M-Instruct against a served reward model (HH-RLHF harmless)",
        "",
        stamp(t0, load0),
        "",
        f"Policy: SmolLM2-135M-Instruct, LoRA (r 16, alpha 32, all linear layers) and a value head; 1 Ray Train worker "
        f"(ZeRO-2, fp32, 1.5 CPUs). {a.steps} PPO steps of 8 prompts x 2 sampled replies (temperature 0.7, up to "
        f"{a.new_tokens} new tokens, prompt cut from its start to {a.max_length - a.new_tokens} tokens), lr {a.lr:g}, "
        f"adaptive KL control (initial coefficient 0.1, `kl_target` {a.kl_target:g} nats per reply, horizon 64 replies). "
        f"Prompts: the {n_train} HH-RLHF harmless train conversations the reward model trained on. Reward: the served "
        f"score alone (`rewards: {{}}`) of `{reward.relative_to(ROOT)}` (benchmarks/results/real_feedback.md: held-out "
        f"pairwise accuracy {acc['reward']['accuracy']:.3f} on {acc['reward']['rows']} pairs, length heuristic "
        f"{acc['reward']['length_heuristic_accuracy']:.3f}), deployed by the job as Serve app `ftray-reward` (0.5 CPU); "
        "each reply is scored in its conversation as the reward model was trained (the chat template over the "
        "history, the prompt and the reply). One setting, fixed before the run; nothing chosen on the held-out prompts.",
        "",
        f"Held-out: the first {a.prompts} prompts of the HH-RLHF harmless test file, greedy replies ({a.new_tokens} new "
        "tokens).",
        "",
        "| served score before | after | mean step KL (all steps) | first quarter -> last quarter | max step KL | "
        "kl_target | KL coefficient first -> last | train s | goal (score up, mean step KL <= target) |",
        "|---:|---:|---:|---|---:|---:|---|---:|---|",
        f"| {b['reward_model_score']:.3f} | {af['reward_model_score']:.3f} | {mean_kl:.3f} | "
        f"{sum(kls[:k]) / k:.3f} -> {sum(kls[-k:]) / k:.3f} | {max(kls):.3f} | {a.kl_target:g} | "
        f"{hist[0].get('train/kl_coef', float('nan')):.3f} -> {hist[-1].get('train/kl_coef', float('nan')):.3f} | "
        f"{rec['train']['train_seconds']:.0f} | {goal} |",
        "",
        "## Win rate over the untouched model (reward hacking shows here)",
        "",
        f"The trained policy (adapter on) and the untouched model (adapter off) answer the same {gen['prompts']} "
        f"held-out prompts greedily; a judge scores both replies; *win rate*: the share where it scores the policy's "
        f"higher, an identical reply (which the judge does not score) a tie counted half (`benchmarks/_cli.py` "
        f"`win_rate`); *over the scored*: the share among the prompts whose replies differ. *Longer reply wins*: the "
        f"same share for the rule \"the longer reply is better\" (ties half). *Balanced*: the scored prompts whose "
        f"replies' lengths differ by at most 20 %. {gen['identical_replies']} of {gen['prompts']} replies are the same "
        f"on both sides; mean characters: policy {gen['policy_chars']:.0f}, untouched {gen['untouched_chars']:.0f}.",
        "",
        "| judge | win rate ± se | over the scored (n) | longer reply wins | balanced n | win rate on balanced "
        "| above 0.5 (by two standard errors) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, label in (("hh", f"the reward model PPO maximised (`{reward.name}`, held-out {acc['reward']['accuracy']:.3f})"),
                        ("oasst", f"a reward model it was not trained against (`{judge.name}`, held-out "
                                  f"{acc['judge']['accuracy']:.3f} on {acc['judge']['rows']} pairs of its own test file)")):
        w = win_rate(gen["prompts"], judged[name])
        md.append(f"| {label} | {w['win']:.3f} ± {w['se']:.3f} | {w['win_scored']:.3f} ({w['scored']}) | {w['longer']:.3f} | "
                  f"{w['balanced_n']} | {w['balanced_win']:.3f} | {win_goal(w)} |")
    md += ["", f"Wall seconds: training job {wall:.0f} (with the reward app's deployment and both evaluations"
           f"{'' if trained_here else '; trained by an earlier run of this script, its run.json total_s'}), "
           f"replies {gen['seconds']:.0f}, judges {judged['hh']['seconds']:.0f} + {judged['oasst']['seconds']:.0f}.", ""]
    out = Path(a.out)
    out.write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
