"""`reward` and `dpo` on a real decoder, SmolLM2-135M-Instruct: a one-label sequence-classification head trained
as a reward model, and the policy itself trained by DPO (LoRA; the reference is the untouched model, the adapter
disabled), judged on held-out preference pairs against the length-only heuristic (issue 15, items 2 and 3). Writes
benchmarks/results/real_feedback.md whole (figures kept per piece in real_feedback.json, with the stamp of the
script run that measured them).

    ftray models get smollm2-135m-instruct runs/smollm2
    python benchmarks/real_feedback.py [--arms lora-hh,lora-oasst,full-hh,dpo-hh,dpo-oasst] [--steps 20]
        [--max-length 256] [--lock /tmp/ray.lock]

Arms: LoRA (r 16, all linear layers; peft trains and saves the `score` head in full) on HH-RLHF harmless and on
oasst1, and full fine-tuning on HH-RLHF harmless; DPO (`loss_type` sigmoid, beta 0.1, LoRA r 16 on all linear
layers) on both sets, judged by its implicit reward beta x (log pi - log ref). Each training run is the in-process loop
(`ftray.train.local.run_local`: one worker, DeepSpeed on one process, no Ray) on the train file less a validation
split carved from it (seeded); the learning rate is chosen among the arm's candidates by pairwise accuracy on that
validation split, never on the test split. The chosen run and the untouched model with a fresh head (seeded) are
then judged on the whole test file by `ftray eval` (`ftray.eval.evaluate`: the method's own metric, with the length
heuristic and the length-balanced subset of `ftray.metrics`). Runs at every `--max-length` (the tokens a
conversation is cut at) share the results file: each table has a tokens column. Each training run and each
evaluation runs in its own process, under `flock LOCK` with `--lock` (one CPU-heavy user at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import Pieces, need_smollm2, one_piece, stamp, win_goal, win_rate  # noqa: E402
from _cli import child as run_child  # noqa: E402

BASE = ROOT / "runs" / "smollm2"
WORK = ROOT / "runs" / "real-feedback"
PREF = ROOT.parent / "shared" / "data" / "preference"
DATASETS = {"hh": ("hh_rlhf_harmless", "HH-RLHF harmless"), "oasst": ("oasst1", "oasst1")}
# Validation pairs carved from each train file (seeded): enough to tell two learning rates apart, few enough to
# judge in well under a minute here.
VAL_PAIRS = {"hh": 64, "oasst": 48}
# arm -> (dataset, adapter, learning-rate candidates, method). LoRA moves few weights and takes a larger step;
# full fine-tuning of a 135M model takes the usual reward-model step, one candidate (no choice made).
ARMS = {
    "lora-hh": ("hh", "lora", (1e-4, 5e-4), "reward"),
    "lora-oasst": ("oasst", "lora", (1e-4, 5e-4), "reward"),
    "full-hh": ("hh", "full", (2e-5,), "reward"),
    "dpo-hh": ("hh", "lora", (1e-4, 5e-4), "dpo"),
    "dpo-oasst": ("oasst", "lora", (1e-4, 5e-4), "dpo"),
    # ipo: one candidate, the lr sigmoid chose on validation for both sets (no choice made on any split)
    "ipo-hh": ("hh", "lora", (1e-4,), "dpo"),
    "ipo-oasst": ("oasst", "lora", (1e-4,), "dpo"),
}
# DPO's `loss_type` of an arm (sigmoid unless named here)
LOSS_TYPE = {"ipo-hh": "ipo", "ipo-oasst": "ipo"}
# The pairwise accuracy of each method's `ftray eval`, by which the lr is chosen.
ACCURACY = {"reward": "accuracy", "dpo": "reward_accuracy"}
LORA = ["adapter.r=16", "adapter.alpha=32", "adapter.target_modules=all-linear", "output.merge=true"]


def split(ds: str, seed: int) -> tuple[Path, Path]:
    """The train file less a seeded validation split -> (fit, val) files under WORK/data."""
    lines = (PREF / f"{DATASETS[ds][0]}_train.jsonl").read_text().splitlines()
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    val = set(order[: VAL_PAIRS[ds]])
    out = WORK / "data"
    out.mkdir(parents=True, exist_ok=True)
    fit, held = out / f"{ds}_fit_seed{seed}.jsonl", out / f"{ds}_val_seed{seed}.jsonl"
    fit.write_text("".join(x + "\n" for i, x in enumerate(lines) if i not in val))
    held.write_text("".join(x + "\n" for i, x in enumerate(lines) if i in val))
    return fit, held


def overrides(arm: str, lr: float, a) -> list[str]:
    ds, adapter, _, method = ARMS[arm]
    fit, _ = split(ds, a.seed)
    # A DPO run keeps its adapter apart: disabling it gives the reference that its evaluation compares with.
    lora = [x for x in LORA if method == "reward" or not x.startswith("output.merge")]
    return [
        f"model.path={BASE}", f"data.train={fit}", "data.eval=null", f"data.max_length={a.max_length}",
        f"adapter.kind={adapter}", *(lora if adapter == "lora" else []),
        "train.epochs=null", f"train.max_steps={a.steps}", f"train.lr={lr}", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.warmup_ratio=null", "train.warmup_steps=2", "train.log_every=5",
        "train.checkpoint_every=1000", f"train.seed={a.seed}", "scaling.num_workers=1",
        f"output.dir={run_dir(arm, lr, a)}", *([f"method.loss_type={LOSS_TYPE[arm]}"] if arm in LOSS_TYPE else []),
    ]


def tag_of(arm: str, a) -> str:
    """The runs of one arm at one length, cut and seed. `reward` runs made since the conversation keeps its end
    (`ftray.methods.reward.cut_ids`) say `-left`; those without cut it on the right (`right_cut_ties`). A `dpo`
    prompt always kept its end."""
    return f"s{a.steps}{'-left' if ARMS[arm][3] == 'reward' else ''}-len{a.max_length}-seed{a.seed}"


def cut_of(tag: str) -> str:
    return "left" if "-left-" in tag else "right"


def before_key(ds: str, a, cut: str = "left", length: int | None = None) -> str:
    """The untouched model with a fresh head, as `ftray eval` cuts now (`left`) or cut before (`right`), at `length`
    tokens (default `--max-length`)."""
    return f"before/{ds}/test/len{length or a.max_length}-seed{a.seed}" + ("-left" if cut == "left" else "")


def len_of(tag: str) -> int:
    """The tokens a conversation is cut at in the runs of `tag` (`...-len{n}-seed{seed}`)."""
    return int(tag.split("-len")[1].split("-")[0])


def steps_of(tag: str) -> int:
    """The optimizer steps of the runs of `tag` (`s{steps}-...`)."""
    return int(tag[1:].split("-")[0])


def run_dir(arm: str, lr: float, a) -> Path:
    return WORK / f"{arm}-lr{lr:g}-{tag_of(arm, a)}"


# ---- the pieces, each in a fresh process ----

def train_one(arm: str, lr: float, a) -> dict:
    from ftray.config import load_spec
    from ftray.train.local import run_local

    t0 = time.time()
    rec = run_local(load_spec(ROOT / "jobs" / f"{ARMS[arm][3]}.yaml", overrides(arm, lr, a)))
    tr = rec["data"]["train"]
    return {"steps": rec["train"]["steps"], "train_seconds": rec["train"]["train_seconds"],
            "final_loss": rec["train"]["final_loss"], "rows": tr["rows"], "truncated": tr["truncated"],
            "trainable": rec["trainable"], "wall_seconds": time.time() - t0}


def eval_one(model: str, data: str, a) -> dict:
    """`ftray eval` of a run folder, or of the untouched base with a fresh head (seeded) cut at `--max-length`."""
    import torch

    from ftray.eval.evaluate import evaluate

    t0 = time.time()
    torch.manual_seed(a.seed)  # the fresh head of the untouched base
    if Path(model).resolve() == BASE.resolve():
        got = evaluate(model, data, method="reward", max_length=a.max_length)
    else:
        got = evaluate(model, data)
    return {**got, "seconds": time.time() - t0}


def generate_one(run: str, data: str, out: str, a) -> dict:
    """Greedy replies of a DPO run's policy (adapter on) and of the untouched model (adapter off) to the first
    `--win-prompts` prompts of `data`, the same `--win-tokens` new tokens each, written to `out` as preference rows
    (`chosen`: the policy's reply, `rejected`: the untouched model's), which a reward run's `ftray eval` then judges:
    its pairwise accuracy is the policy's win rate (a tie counts half)."""
    import torch

    from ftray.config import PEFT_KINDS
    from ftray.data.rows import read_checked
    from ftray.methods import get_method, load_run_model, run_spec
    from ftray.models.load import load_tokenizer, resolve
    from ftray.runs import RunFolder

    t0 = time.time()
    spec, resolved = run_spec(RunFolder(run)), resolve(run, None, "RUN")
    if spec.adapter.kind not in PEFT_KINDS:  # the untouched side is the same model with its adapter disabled
        sys.exit(f"{run}: a {spec.adapter.kind} run; the win rate needs an adapter run (its base is the untouched model)")
    model = load_run_model(spec, resolved, torch.float32, method=get_method(spec.method.kind)).eval()
    tok = load_tokenizer(resolved.tokenizer)
    tok.padding_side = "left"
    rows = read_checked(data, "preference", "skip").rows[: a.win_prompts]
    prompts = [tok.apply_chat_template([*r.get("history", []), {"role": "user", "content": r["prompt"]}],
                                       tokenize=False, add_generation_prompt=True) for r in rows]
    room = a.max_length - a.win_tokens  # the prompt keeps its end, as training cut it
    ids = [tok(p, add_special_tokens=False)["input_ids"][-room:] for p in prompts]
    replies: dict[str, list[str]] = {"policy": [], "untouched": []}
    for i in range(0, len(ids), 16):
        enc = tok.pad({"input_ids": ids[i : i + 16]}, return_tensors="pt")
        for side in replies:
            with torch.no_grad(), (model.disable_adapter() if side == "untouched" else contextlib.nullcontext()):
                g = model.generate(**enc, max_new_tokens=a.win_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            replies[side] += tok.batch_decode(g[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    Path(out).write_text("".join(
        json.dumps({**{k: r[k] for k in ("prompt", "history") if k in r}, "chosen": p.strip(), "rejected": u.strip()}) + "\n"
        for r, p, u in zip(rows, replies["policy"], replies["untouched"], strict=True)))
    same = sum(p.strip() == u.strip() for p, u in zip(replies["policy"], replies["untouched"], strict=True))
    mean = {k: sum(map(len, v)) / len(v) for k, v in replies.items()}
    return {"prompts": len(rows), "identical_replies": same, "policy_chars": mean["policy"],
            "untouched_chars": mean["untouched"], "seconds": time.time() - t0}


def child(piece: list[str], a) -> dict:
    args = ["--steps", str(a.steps), "--max-length", str(a.max_length), "--seed", str(a.seed),
            "--win-prompts", str(a.win_prompts), "--win-tokens", str(a.win_tokens)]
    return run_child(__file__, piece, args, a.lock, WORK / "logs")


# ---- the driver ----

def pairs_info(data: Path, max_length: int) -> dict:
    """Rows as every evaluation reads them, the length heuristic's own count of balanced pairs, and how many pairs
    have a reply cut at `max_length` (the scorer reads the last kept token)."""
    from ftray.data.rows import read_checked
    from ftray.methods.reward import render
    from ftray.metrics import length_baseline
    from ftray.models.load import load_tokenizer

    rows = read_checked(str(data), "preference", "skip").rows
    tok = load_tokenizer(str(BASE))
    cut = sum(any(len(tok(render(tok, r, r[k]))["input_ids"]) > max_length for k in ("chosen", "rejected")) for r in rows)
    heuristic, balanced = length_baseline(rows)
    return {"pairs": len(rows), "truncated_pairs": cut, "length_heuristic": heuristic, "balanced_pairs": len(balanced)}


def right_cut_ties(data: Path, max_length: int) -> dict:
    """Pairs whose two replies a cut on the right at `max_length` leaves the same tokens (the conversation fills the
    budget before the replies start): how `reward` cut before it kept the end (`ftray.methods.reward.cut_ids`)."""
    from ftray.data.rows import read_checked
    from ftray.methods.reward import render
    from ftray.models.load import load_tokenizer

    rows = read_checked(str(data), "preference", "skip").rows
    tok = load_tokenizer(str(BASE))
    ids = lambda r, k: tok(render(tok, r, r[k]))["input_ids"][:max_length]  # noqa: E731
    return {"pairs": len(rows), "tied": sum(ids(r, "chosen") == ids(r, "rejected") for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of 8 pairs per training run")
    ap.add_argument("--lrs", default=None, help="comma-separated learning rates to train, in place of the arm's "
                    "candidates (one: no choice on validation; fixed before the run)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per scored reply (history + prompt + reply)")
    ap.add_argument("--seed", type=int, default=0, help="validation split, data order, head init")
    ap.add_argument("--lock", default=None, help="run each training run and evaluation under `flock LOCK`")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "real_feedback.json"))
    ap.add_argument("--win", default="", help="DPO arms whose win rate over the untouched model to judge, by the "
                    "chosen reward run of the same data set (e.g. dpo-hh)")
    ap.add_argument("--judge-steps", type=int, default=None, help="the judging reward run's steps (default: --steps): "
                    "a policy of 20 steps judged by the reward model of 100")
    ap.add_argument("--win-prompts", type=int, default=128, help="test prompts of the win rate")
    ap.add_argument("--win-tokens", type=int, default=64, help="new tokens of each greedy reply (both sides)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a piece, in a child process
    a = ap.parse_args()
    if a.one:
        return one_piece(a.one, {"train": lambda arm, lr: train_one(arm, float(lr), a),
                                  "eval": lambda *x: eval_one(*x, a), "generate": lambda *x: generate_one(*x, a)})
    need_smollm2(BASE)
    t0, load0 = time.time(), os.getloadavg()
    piece = Pieces(a.results)
    saved = piece.saved
    for arm in a.arms.split(","):
        ds, _, lrs, method = ARMS[arm]
        lrs = tuple(float(x) for x in a.lrs.split(",")) if a.lrs else lrs
        tag = tag_of(arm, a)
        test = PREF / f"{DATASETS[ds][0]}_test.jsonl"
        _, val = split(ds, a.seed)
        piece(f"info/{ds}/test/len{a.max_length}", pairs_info, test, a.max_length)
        piece(f"info/{ds}/val/len{a.max_length}-seed{a.seed}", pairs_info, val, a.max_length)
        piece(f"ties/{ds}/test/len{a.max_length}", right_cut_ties, test, a.max_length)
        if method == "reward":  # DPO's untouched policy is its reference: implicit reward 0, every pair a tie
            piece(before_key(ds, a), child, ["eval", str(BASE), str(test)], a)
        for lr in lrs:
            piece(f"train/{arm}/lr{lr:g}/{tag}", child, ["train", arm, str(lr)], a)
            if len(lrs) > 1:
                piece(f"val/{arm}/lr{lr:g}/{tag}", child, ["eval", str(run_dir(arm, lr, a)), str(val)], a)
        acc = ACCURACY[method]
        best = max(lrs, key=lambda lr: saved[f"val/{arm}/lr{lr:g}/{tag}"][acc]) if len(lrs) > 1 else lrs[0]  # noqa: B023
        piece(f"test/{arm}/lr{best:g}/{tag}", child, ["eval", str(run_dir(arm, best, a)), str(test)], a)
        saved[f"chosen/{arm}/{tag}"] = best
        piece.save()
    for arm in filter(None, a.win.split(",")):
        ds, judge, tag = ARMS[arm][0], f"lora-{ARMS[arm][0]}", tag_of(arm, a)
        ja = argparse.Namespace(**{**vars(a), "steps": a.judge_steps or a.steps})  # the judge's own length
        jtag = tag_of(judge, ja)
        for need, t, steps in ((arm, tag, a.steps), (judge, jtag, ja.steps)):
            if f"chosen/{need}/{t}" not in saved:
                sys.exit(f"--win {arm}: no chosen `{need}` run at {t} in {a.results}; run `--arms {need} --steps "
                         f"{steps}` first (the judge is the reward run of the same data set and cut, at --judge-steps)")
        lr, rm_lr = saved[f"chosen/{arm}/{tag}"], saved[f"chosen/{judge}/{jtag}"]
        policy, rm = run_dir(arm, lr, a), run_dir(judge, rm_lr, ja)
        # A run folder that is gone is trained again, the same settings and seed (the table compares the losses).
        if not (rm / "run.json").exists():
            piece(f"retrain/{judge}/lr{rm_lr:g}/{jtag}", child, ["train", judge, str(rm_lr)], ja)
        out = WORK / "data" / f"win-{arm}-{tag}-n{a.win_prompts}-t{a.win_tokens}.jsonl"
        key = f"win/{arm}/{tag}/n{a.win_prompts}-t{a.win_tokens}"
        jkey = f"{key}/judge" + ("" if ja.steps == a.steps else f"@{jtag}")
        judged = saved.get(jkey)
        if judged and Path(judged["run"]).name != rm.name:  # a verdict by another reward run: judged again
            saved.pop(jkey)
        if jkey not in saved and not out.exists():
            # The replies are generated again; every verdict on the old ones goes with them.
            for k in [k for k in saved if k.startswith(f"{key}/")]:
                saved.pop(k)
            if not (policy / "run.json").exists():
                piece(f"retrain/{arm}/lr{lr:g}/{tag}", child, ["train", arm, str(lr)], a)
        piece(f"{key}/generate", child, ["generate", str(policy), str(PREF / f"{DATASETS[ds][0]}_test.jsonl"), str(out)], a)
        piece(jkey, child, ["eval", str(rm), str(out)], a)
    write_markdown(saved, a, stamp(t0, load0))


def _goal(after: dict, acc: str) -> str:
    beats = after[acc] > after["length_heuristic_accuracy"]
    balanced = after["balanced_accuracy"] > 0.5
    return "**met**" if beats and balanced else (
        "missed: " + " and ".join(x for x, ok in (("not above the length heuristic", beats),
                                                   ("not above 0.5 on the balanced subset", balanced)) if not ok))


def _both(after: dict, acc: str) -> str:
    return "yes" if after[acc] > max(h := after["length_heuristic_accuracy"], 1 - h) else "**no**"


def _chosen(saved: dict, arm: str, tag: str) -> tuple[str, str, float, dict, dict, dict]:
    """An arm's data set, adapter, chosen lr, its test split's info, the chosen run's training and test figures, for
    the runs of one `tag` (steps, cut, seed)."""
    ds, adapter, _, _ = ARMS[arm]
    best = saved[f"chosen/{arm}/{tag}"]
    return (ds, adapter, best, saved[f"info/{ds}/test/len{len_of(tag)}"], saved[f"train/{arm}/lr{best:g}/{tag}"],
            saved[f"test/{arm}/lr{best:g}/{tag}"])


def _label(arm: str, tag: str) -> str:
    return f"{arm}, {cut_of(tag)} cut" if ARMS[arm][3] == "reward" else arm


def _tags(saved: dict, a) -> list[str]:
    """Every run length and cut measured at this seed (`s{steps}[-left]-len{length}-seed{seed}`), the shortest cut
    first, then the fewest steps, a right cut before a left one."""
    end = f"-seed{a.seed}"
    found = {k.rsplit("/", 1)[1] for k in saved if k.startswith("chosen/") and k.endswith(end)}
    return sorted(found, key=lambda t: (len_of(t), steps_of(t), cut_of(t) == "left"))


def write_markdown(saved: dict, a, stamped: str) -> None:
    tags = _tags(saved, a)
    # (arm, tag) of every chosen run: an arm's runs of different lengths side by side
    arms = [(arm, tag) for arm in ARMS for tag in tags if f"chosen/{arm}/{tag}" in saved]
    steps = sorted({steps_of(t) for t in tags})
    lengths = sorted({len_of(t) for t in tags})
    lines = [
        "# `reward` and `dpo` on SmolLM2-135M-Instruct against the length heuristic (benchmarks/real_feedback.py)",
        "",
        f"Written by {stamped}",
        "",
        "SmolLM2-135M-Instruct (`ftray models get smollm2-135m-instruct`), trained by the in-process loop "
        f"(`run_local`: one worker, DeepSpeed ZeRO-2 on one process, fp32, CPU), {' or '.join(map(str, steps))} "
        "optimizer steps of 8 pairs (micro-batch 4, 2 warm-up steps; the steps column says which, each length "
        f"chooses its own lr), conversations cut at {' or '.join(map(str, lengths))} tokens (history + prompt + reply; "
        "the tokens column says which). "
        "The learning rate is chosen by pairwise accuracy on a validation split carved from the train file (seed "
        f"{a.seed}: {VAL_PAIRS['hh']} HH pairs, {VAL_PAIRS['oasst']} oasst1 pairs), which the run does not train on; "
        "the test split is judged once, by the chosen run (a tie on validation goes to the smaller lr; an arm run with "
        "one candidate, `--lrs`, says \"one candidate: not evaluated\" in the last table: its lr was fixed before the "
        "run). *Length heuristic*: the longer reply is the chosen one "
        "(`ftray.metrics.length_baseline`, characters; a tie counts half). *Balanced*: the pairs whose replies' "
        "lengths differ by at most 20 %, where that heuristic is near a coin toss. Goal (issue 15, items 2 and 3): "
        "held-out accuracy above the length heuristic, and above 0.5 on the balanced subset. Where the shorter reply "
        "is the chosen one more often (HH harmless), the heuristic is below 0.5 and its reverse, *shorter wins* (a "
        "tie counts half either way), is the rule a model could learn from length alone: the last column asks for "
        "more than both.",
        "",
        "## `reward`: a one-label sequence-classification head",
        "",
        "`LlamaForSequenceClassification` scores the last non-pad token of the conversation rendered by the chat "
        "template, as `/v1/rewards` does; Bradley-Terry loss. *Before*: the untouched model with a fresh head (seed "
        f"{a.seed}) on the same pairs and cut.",
        "",
        "| arm | cut | tokens | test pairs | lr (chosen on validation) | steps | train s | accuracy before | accuracy after "
        "| length heuristic | shorter wins | balanced n | balanced before | balanced after | margin after | goal "
        "| above both length rules |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, tag in (x for x in arms if ARMS[x[0]][3] == "reward"):
        ds, adapter, best, info, tr, after = _chosen(saved, arm, tag)
        before = saved[before_key(ds, a, cut_of(tag), len_of(tag))]
        lines.append(
            f"| {adapter}, {DATASETS[ds][1]} | {cut_of(tag)} | {len_of(tag)} | {info['pairs']} ({info['truncated_pairs']} cut) "
            f"| {best:g} | {tr['steps']} "
            f"| {tr['train_seconds']:.0f} | {before['accuracy']:.3f} | {after['accuracy']:.3f} "
            f"| {after['length_heuristic_accuracy']:.3f} | {1 - after['length_heuristic_accuracy']:.3f} | {info['balanced_pairs']} "
            f"| {before['balanced_accuracy']:.3f} | {after['balanced_accuracy']:.3f} | {after['margin']:+.3f} "
            f"| {_goal(after, 'accuracy')} | {_both(after, 'accuracy')} |"
        )
    right = sorted({len_of(t) for _, t in arms if cut_of(t) == "right"})  # right-cut reward runs exist at these
    ties = {(ds, n): saved[k] for n in right for ds in DATASETS if (k := f"ties/{ds}/test/len{n}") in saved}
    if ties:
        lines += ["", "*Cut* `right`: the run (and its *before*) cut a conversation on the right, as `reward` did until it "
                  "kept the end (`ftray.methods.reward.cut_ids`; `left`: runs since, training and evaluation alike): a "
                  "pair whose conversation fills the tokens before its replies begin was scored on the same "
                  "tokens for both replies, a tie (counted half) that no training could move: " + "; ".join(
                      f"{t['tied']} of the {t['pairs']} {DATASETS[ds][1]} test pairs at {n} tokens"
                      for (ds, n), t in ties.items()) + "."]
    lines += [
        "",
        "## `dpo`: the policy itself, judged by its implicit reward",
        "",
        "LoRA (r 16, alpha 32, all linear layers), beta 0.1, `loss_type` sigmoid (the ipo arms: IPO's squared loss, "
        "beta its tau; one lr, the one sigmoid chose); the reference is the untouched "
        "model (the adapter disabled). A pair is ranked by the implicit reward beta x (log pi - log ref) summed over "
        "each reply's tokens. Before training every implicit reward is 0: every pair a tie, accuracy 0.5 by "
        "construction, so no *before* run.",
        "",
        "| arm | tokens | test pairs | lr (chosen on validation) | steps | train s | implicit-reward accuracy "
        "| length heuristic | shorter wins | balanced n | balanced accuracy | implicit-reward margin | goal "
        "| above both length rules |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, tag in (x for x in arms if ARMS[x[0]][3] == "dpo"):
        ds, adapter, best, info, tr, after = _chosen(saved, arm, tag)
        lines.append(
            f"| dpo {LOSS_TYPE.get(arm, 'sigmoid')} {adapter}, {DATASETS[ds][1]} | {len_of(tag)} | {info['pairs']} | {best:g} "
            f"| {tr['steps']} | {tr['train_seconds']:.0f} "
            f"| {after['reward_accuracy']:.3f} | {after['length_heuristic_accuracy']:.3f} "
            f"| {1 - after['length_heuristic_accuracy']:.3f} | {info['balanced_pairs']} | {after['balanced_accuracy']:.3f} "
            f"| {after['reward_margin']:+.4f} | {_goal(after, 'reward_accuracy')} | {_both(after, 'reward_accuracy')} |"
        )
    # a verdict: `win/{arm}/{tag}/{n}-{t}/judge` (the judge at the policy's steps) or `.../judge@{judge's tag}`
    wins = sorted(k for k in saved if k.startswith("win/") and k.split("/")[4].split("@")[0] == "judge"
                  and k.split("/")[2] in tags)
    if wins:
        lines += [
            "",
            "## `dpo`: win rate over the untouched model, judged by the reward model",
            "",
            "The chosen DPO run's policy (adapter on) and the untouched model (adapter off) each answer the first test "
            "prompts greedily, the same number of new tokens, the prompt cut to keep its end. The chosen `reward` run "
            "of the same data set (LoRA, above; the *judge* column names it) scores both replies; *win rate* is the "
            "share of prompts where it "
            "scores the policy's reply higher, an identical reply (which the judge does not score) a tie counted half "
            "(`benchmarks/_cli.py` `win_rate`); *over the scored*: the share among the prompts whose replies differ. "
            "*Longer reply wins*: the same share for the rule \"the longer reply is better\" (ties half), to show how "
            "much of the win is length. *Balanced*: the scored prompts whose replies' lengths differ by at most 20 %. "
            "± one standard error over the prompts (each scores 1, 0.5 or 0). Goal (item 3): a win rate above 50 %, met "
            "when it clears 0.5 by two standard errors (less is not told apart from a coin flip on this many prompts).",
            "",
            "| arm | steps | judge | prompts | new tokens | identical replies | mean chars policy / untouched | win rate "
            "| over the scored (n) | longer reply wins | balanced n | win rate on balanced | goal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in wins:
            arm, tag, n_t = k.split("/")[1:4]
            g = saved[k.rsplit("/", 1)[0] + "/generate"]
            w = win_rate(g["prompts"], saved[k])
            lines.append(
                f"| {arm} | {steps_of(tag)} | `{Path(saved[k]['run']).name}` | {g['prompts']} | {n_t.split('-t')[1]} "
                f"| {g['identical_replies']} "
                f"| {g['policy_chars']:.0f} / {g['untouched_chars']:.0f} | {w['win']:.3f} ± {w['se']:.3f} | {w['win_scored']:.3f} ({w['scored']}) "
                f"| {w['longer']:.3f} | {w['balanced_n']} | {w['balanced_win']:.3f} "
                f"| {win_goal(w)} |")
        retrained = [k for k in saved if k.startswith("retrain/") and k.rsplit("/", 1)[1] in tags]
        if retrained:
            first = {k: saved["train/" + k.removeprefix("retrain/")]["final_loss"] for k in retrained}
            lines += ["", "A run folder the win rate needed (the judge's, or the policy's whose replies were generated "
                      "again) was gone; it was trained again with the "
                      "same settings and seed (" + "; ".join(
                          f"`{k}`: final train loss {saved[k]['final_loss']!r}, the first training's {first[k]!r}"
                          + (", the same to the last digit" if saved[k]["final_loss"] == first[k] else ": they differ")
                          for k in retrained) + "). The training and test figures in the tables above are the first training's; a "
                      "retrained policy's replies are those its win rate judges."]
    lines += [
        "",
        "## Choosing the learning rate (validation split of the train file)",
        "",
        "| arm | steps | tokens | validation pairs (cut) | lr | train s | final train loss | validation accuracy "
        "| length heuristic there | balanced n | balanced accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, tag in arms:
        ds, _, lrs, method = ARMS[arm]
        acc = ACCURACY[method]
        vinfo = saved[f"info/{ds}/val/len{len_of(tag)}-seed{a.seed}"]
        for lr in (lr for lr in lrs if f"train/{arm}/lr{lr:g}/{tag}" in saved):  # --lrs may have run fewer
            tr = saved[f"train/{arm}/lr{lr:g}/{tag}"]
            v = saved.get(f"val/{arm}/lr{lr:g}/{tag}")
            figs = (f"{v[acc]:.3f} | {v['length_heuristic_accuracy']:.3f} | {vinfo['balanced_pairs']} | "
                    f"{v['balanced_accuracy']:.3f}") if v else "one candidate: not evaluated | | |"
            lines.append(f"| {_label(arm, tag)} | {steps_of(tag)} | {len_of(tag)} | {vinfo['pairs']} ({vinfo['truncated_pairs']}) "
                         f"| {lr:g} | {tr['train_seconds']:.0f} "
                         f"| {tr['final_loss']:.4f} | {figs} |")
    def name(arm: str, tag: str) -> str:
        return f"{_label(arm, tag)} ({steps_of(tag)} steps, {len_of(tag)} tokens)"

    chosen = {name(arm, tag): _chosen(saved, arm, tag)[4] for arm, tag in arms}
    tested = {name(arm, tag): _chosen(saved, arm, tag)[5] for arm, tag in arms}
    untouched = {f"{ds}, {cut_of(t)} cut, {len_of(t)} tokens": saved[before_key(ds, a, cut_of(t), len_of(t))]
                 for ds, t in dict.fromkeys((ARMS[x][0], t) for x, t in arms if ARMS[x][3] == "reward")}
    lines += ["", "Training pairs with a reply cut at the run's tokens (chosen runs): "
              + "; ".join(f"{arm} {c['truncated']} of {c['rows']}" for arm, c in chosen.items()) + "."]
    lines += ["", "Test evaluation seconds (`ftray eval`, one process, batches of 16 pairs; DPO's include the "
              "reference's forward): "
              + "; ".join([f"untouched + fresh head, {ds}: {u['seconds']:.0f}" for ds, u in untouched.items()]
                          + [f"{arm}: {t['seconds']:.0f}" for arm, t in tested.items()]) + "."]
    missing = [arm for arm in ARMS if arm not in {x for x, _ in arms}]
    if missing:
        lines += ["", "Not measured (in no `--arms` run so far): " + ", ".join(f"`{m}`" for m in missing) + "."]
    lines += ["", "Measured by (each piece's total includes its wait for the lock):", ""]
    lines += [f"- `{k}`: {v['stamp']}" for k, v in saved.items() if isinstance(v, dict) and "stamp" in v
              and (any(t in k for t in tags) or any(k.endswith(f"len{n}") or f"len{n}-" in k for n in lengths))]
    out = Path(a.results).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
