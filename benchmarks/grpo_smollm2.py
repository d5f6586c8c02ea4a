"""`grpo` on a real decoder, SmolLM2-135M-Instruct, with a verifiable reward on answer-only two-digit sums, and
beside it the SFT control on as many examples (issue 15, item 4). Writes benchmarks/results/grpo_smollm2.md whole
(figures kept per piece in grpo_smollm2.json, each with the stamp of the script run that measured it).

    ftray models get smollm2-135m-instruct runs/smollm2
    python benchmarks/grpo_smollm2.py [--steps 40] [--longer 120 [--longer-recipe R]] [--train-seeds 1,2]
        [--shipped-seeds 1,2] [--gsm8k-steps 10] [--lock /tmp/ray.lock]

The task: "What is {a} + {b}? Answer with the number only." for 10 <= a, b <= 99, as chat rows (`ftray data
arithmetic --min-operand 10 --max-operand 99 --question ...`); 200 sums held out for the test, 64 more carved from
the train file (seeded) for validation. No SFT warm start: GRPO starts from the instruct model itself
(`jobs/grpo_arith_smollm2.yaml`: LoRA, G completions per prompt, reward 1 for the exact answer + 0.5 for a right last
number + w for a completion that is one number). The control is SFT (`jobs/sft_chat_smollm2.yaml`, LoRA, the
same adapter) on labelled rows, as many as the GRPO run generated: steps x prompts per step x G. Each arm's learning
rate (GRPO's: with a reward recipe, `RECIPES`) is chosen among its candidates by greedy exact match on the validation
split (which its training loop judges before and after); the chosen run and the untouched model are judged once on
the test split by `ftray eval` (greedy; the untouched model at `NEW_TOKENS`, a run at its own job's budget and, where
its recipe names a smaller one, at `NEW_TOKENS` too). Each training run and evaluation runs in its own process
(in-process loop `run_local`: one worker, DeepSpeed on one process, no Ray), under `flock LOCK` with `--lock`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import Pieces, need_smollm2, one_piece, stamp  # noqa: E402
from _cli import child as run_child  # noqa: E402

BASE = ROOT / "runs" / "smollm2"
WORK = ROOT / "runs" / "grpo-smollm2"
QUESTION = "What is {a} + {b}? Answer with the number only."
TEST_SUMS, VAL_SUMS, MAX_LENGTH = 200, 64, 64
# The generation budget the untouched model, the SFT control and a GRPO recipe that names none are judged at (a
# recipe may name its own; the shipped job takes the chosen recipe's).
NEW_TOKENS = 16
ARMS = {"grpo": "grpo_arith_smollm2.yaml", "sft": "sft_chat_smollm2.yaml"}  # arm -> its job
# Each arm's candidates: (lr, reward recipe; SFT's recipe is "", none). GRPO's LoRA takes a larger step than SFT's:
# its signal is a few sampled answers a step, SFT's every labelled token. The reward is 1 exact + 0.5 numeric + w for a completion that is one
# number (the format term); a recipe sets w and whether advantages are divided by the group's standard deviation
# (`method.scale_rewards`). At w 0.5 a wrong bare number earns what a right equation earns, and the policy collapses
# onto bare numbers; at w 0 it never samples one (the untouched model's share, ~6 %, fell to 0 in 3 steps of an ad hoc
# run) and exact match stays 0. Under the std scaling a smaller w changes little: in a group where no completion is
# right, the format term is the only spread, and scaling blows it up to the size a right answer gets. Without the
# scaling (Dr. GRPO's advantages) w 0.1 moves the policy a fifth as far as a right answer's 0.5 to 1.5 does; but then
# it learns the sums as equations ("47 + 38 = 85", numeric match) and drops bare numbers again. A recipe may also set
# the generation budget (training and evaluation alike): 4 new tokens hold a three-digit sum and the end of the turn,
# and no equation, so only an answer that comes first can be right. The chosen run is judged at NEW_TOKENS as well:
# exact match is the stripped reply equal to the sum, so "85\n" cut there counts where 16 tokens might go on.
# A recipe may also leave out of the loss the completions the budget cut (`method.mask_truncated_completions`, TRL's):
# at 4 tokens a cut reply ("85\n\nThe") earns what a finished one ("85" and the end of the turn) earns, and 120 steps
# taught the policy to stop ending its turn (the test split's exact match 0.730 at 4 tokens, 0.000 at 16).
# A recipe may also add partial credit for a near number (`numeric_closeness`, weight c: 1 - the last number's
# relative error, floored at 0). With 0/1 rewards alone, a group whose replies are all wrong bare numbers earns 0.1
# each and teaches nothing; a training seed of the masked recipe fell into that at step ~13 (every reply one digit and
# the end of the turn, the shortest bare number) and never left it. Closeness tells such replies apart.
# recipe -> (w, std scaling, new tokens or None, mask truncated completions, c)
RECIPES = {"": (0.5, True, None, False, 0.0), "format0.1": (0.1, True, None, False, 0.0),
           "format0.1-noscale": (0.1, False, None, False, 0.0), "format0.1-noscale-4tok": (0.1, False, 4, False, 0.0),
           "format0.1-noscale-4tok-mask": (0.1, False, 4, True, 0.0),
           "format0.1-noscale-4tok-mask-close0.5": (0.1, False, 4, True, 0.5)}
CANDIDATES = {
    "grpo": ((2e-4, ""), (1e-3, ""), (2e-4, "format0.1"), (2e-4, "format0.1-noscale"), (2e-4, "format0.1-noscale-4tok"),
             (2e-4, "format0.1-noscale-4tok-mask")),
    "sft": ((1e-4, ""), (5e-4, "")),
}
PROMPTS_PER_STEP = 8


def cand(lr: float, recipe: str = "") -> str:
    """A candidate's name in keys and folders: the lr, and the recipe where it is not the first one (w 0.5, scaled;
    measured before the recipe was a candidate)."""
    return f"lr{lr:g}" + (f"-{recipe}" if recipe else "")


def show(arm: str, lr: float, recipe: str = "") -> str:
    if arm != "grpo":
        return f"{lr:g}"
    w, scale, new, mask, close = RECIPES[recipe]
    return (f"{lr:g}, w {w:g}" + ("" if scale else ", no std scaling") + (f", {new} new tokens" if new else "")
            + (", cut replies masked" if mask else "") + (f", closeness {close:g}" if close else ""))


def data(seed: int) -> tuple[Path, Path, Path]:
    """(fit, val, test): the task's train file less a seeded validation split, and its test file."""
    from ftray.data.synthetic import write_arithmetic

    out = WORK / "data"
    train, test = write_arithmetic(out, max_operand=99, min_operand=10, test_size=TEST_SUMS, seed=0, question=QUESTION)
    lines = train.read_text().splitlines()
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    val = set(order[:VAL_SUMS])
    fit, held = out / f"fit_seed{seed}.jsonl", out / f"val_seed{seed}.jsonl"
    fit.write_text("".join(x + "\n" for i, x in enumerate(lines) if i not in val))
    held.write_text("".join(x + "\n" for i, x in enumerate(lines) if i in val))
    return fit, held, test


@functools.cache
def grpo_job():
    """The shipped GRPO job's method (its G)."""
    from ftray.config import load_spec

    return load_spec(ROOT / "jobs" / ARMS["grpo"]).method


def sft_steps(a) -> int:
    """SFT's steps: as many labelled rows (8 a step) as the GRPO run samples completions."""
    return a.steps * grpo_job().group_size


def run_dir(arm: str, lr: float, a, recipe: str = "", train_seed: int | None = None) -> Path:
    again = "" if train_seed is None else f"-train{train_seed}"
    return WORK / f"{arm}-{cand(lr, recipe)}-s{a.steps}-seed{a.seed}{again}"


def overrides(arm: str, lr: float, a, recipe: str = "", train_seed: int | None = None) -> list[str]:
    fit, val, _ = data(a.seed)
    common = [
        f"model.path={BASE}", f"data.train={fit}", f"data.eval={val}", "data.eval_max_rows=null",
        f"data.max_length={MAX_LENGTH}", f"train.lr={lr}", f"train.global_batch_size={PROMPTS_PER_STEP}",
        "train.warmup_steps=0", "train.eval_every=100000", "train.checkpoint_every=100000", "train.log_every=5",
        f"train.seed={a.seed if train_seed is None else train_seed}", "scaling.num_workers=1",
        f"output.dir={run_dir(arm, lr, a, recipe, train_seed)}",
    ]
    if arm == "grpo":
        w, scale, new, mask, close = RECIPES[recipe]
        return [*common, f"train.max_steps={a.steps}", "train.micro_batch_size=4", "method.rewards.exact_match=1.0",
                "method.rewards.numeric_match=0.5", f"method.rewards.format={w}", f"method.scale_rewards={scale}",
                f"method.max_new_tokens={new or NEW_TOKENS}", f"method.mask_truncated_completions={mask}",
                *([f"method.rewards.numeric_closeness={close}"] if close else [])]
    return [*common, f"train.max_steps={sft_steps(a)}", "train.micro_batch_size=8", "method.exact_match=true",
            f"method.max_new_tokens={NEW_TOKENS}", "data.packing=false"]


# ---- the pieces, each in a fresh process ----

def gsm8k_one(a) -> dict:
    """`jobs/grpo_gsm8k.yaml` as shipped, on SmolLM2, in process for `--gsm8k-steps` steps; GSM8K test before and
    after (the job's `eval_max_rows` first test problems, greedy, numeric match of the last number)."""
    from ftray.config import load_spec
    from ftray.train.local import run_local

    t0 = time.time()
    out = WORK / f"gsm8k-s{a.gsm8k_steps}-seed{a.seed}"
    spec = load_spec(ROOT / "jobs" / "grpo_gsm8k.yaml", [
        f"model.path={BASE}", f"train.max_steps={a.gsm8k_steps}", f"train.seed={a.seed}", "scaling.num_workers=1",
        f"output.dir={out}"])
    rec = run_local(spec)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"steps": rec["train"]["steps"], "train_seconds": rec["train"]["train_seconds"],
            "eval_rows": spec.data.eval_max_rows, "max_new_tokens": spec.method.max_new_tokens,
            "group_size": spec.method.group_size, "lr": spec.train.lr, "prompts_per_step": spec.train.global_batch_size,
            "before": rec["eval"]["before"], "after": rec["eval"]["after"],
            "sampled_reward": [s["train/reward_mean"] for s in steps],
            "generate_share": sum(s["train/generate_share"] for s in steps) / max(1, len(steps)),
            "completion_len": sum(s["train/completion_len"] for s in steps) / max(1, len(steps)),
            "wall_seconds": time.time() - t0}


def train_one(arm: str, lr: float, a, recipe: str = "", train_seed: int | None = None) -> dict:
    from ftray.config import load_spec
    from ftray.train.local import run_local

    t0 = time.time()
    rec = run_local(load_spec(ROOT / "jobs" / ARMS[arm], overrides(arm, lr, a, recipe, train_seed)))
    steps = [json.loads(x) for x in (run_dir(arm, lr, a, recipe, train_seed) / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    out = {"steps": rec["train"]["steps"], "train_seconds": rec["train"]["train_seconds"],
           "final_loss": rec["train"]["final_loss"], "rows": rec["data"]["train"]["rows"],
           "val_before": rec["eval"]["before"], "val_after": rec["eval"]["after"], "wall_seconds": time.time() - t0}
    if arm == "grpo":
        k = max(1, len(steps) // 5)  # the first and last fifth of the steps
        for key in ("reward_exact_match", "reward_numeric_match", "reward_format", "completion_len", "generate_share",
                    "truncated", *(["reward_numeric_closeness"] if "train/reward_numeric_closeness" in steps[0] else [])):
            out[f"first_{key}"] = sum(s[f"train/{key}"] for s in steps[:k]) / k
            out[f"last_{key}"] = sum(s[f"train/{key}"] for s in steps[-k:]) / k
        out["completions"] = a.steps * PROMPTS_PER_STEP * grpo_job().group_size
    return out


def eval_one(model: str, data_file: str, a, new_tokens: str = "") -> dict:
    """`ftray eval` of a run folder (at its own job's generation budget, or at `new_tokens`), or of the untouched base
    judged as a grpo job of the same cut at `NEW_TOKENS`."""
    from ftray.eval.evaluate import evaluate

    t0 = time.time()
    if Path(model).resolve() == BASE.resolve():
        got = evaluate(model, data_file, method="grpo", fmt="chat", max_length=MAX_LENGTH,
                       method_options={"max_new_tokens": NEW_TOKENS})
    else:
        got = evaluate(model, data_file, method_options={"max_new_tokens": int(new_tokens)} if new_tokens else None)
    return {**got, "seconds": time.time() - t0}


def at_steps(a, steps) -> argparse.Namespace:
    """The script's settings with GRPO's steps set to `steps` (None: as given)."""
    return a if steps is None else argparse.Namespace(**{**vars(a), "steps": int(steps)})


def child(piece: list[str], a) -> dict:
    args = ["--steps", str(a.steps), "--seed", str(a.seed), "--gsm8k-steps", str(a.gsm8k_steps)]
    return run_child(__file__, piece, args, a.lock, WORK / "logs")


# ---- the driver ----

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help=f"GRPO steps of {PROMPTS_PER_STEP} prompts")
    ap.add_argument("--seed", type=int, default=0, help="validation split, data order, sampling")
    ap.add_argument("--lock", default=None, help="run each training run and evaluation under `flock LOCK`")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "grpo_smollm2.json"))
    ap.add_argument("--gsm8k-steps", type=int, default=0, help="also run jobs/grpo_gsm8k.yaml on SmolLM2 this many steps")
    ap.add_argument("--longer", type=int, default=0,
                    help="also train GRPO this many steps at the lr chosen at --steps (no new choice), judged on the "
                    "validation and test splits as the chosen run")
    ap.add_argument("--longer-recipe", default=None, choices=sorted(RECIPES),
                    help="the recipe of the --longer run (default: the one chosen at --steps), at the chosen lr")
    ap.add_argument("--train-seeds", default="",
                    help="also train the chosen GRPO run again with these training seeds (data order, sampling; the "
                    "same validation split), comma-separated, each judged on the validation and test splits")
    ap.add_argument("--shipped-seeds", default="",
                    help="also train the run the shipped job takes (chosen at 16 tokens among the chosen and longer "
                    "runs) again with these training seeds, comma-separated, each judged on the validation and test splits")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a piece, in a child process
    a = ap.parse_args()
    if a.one:
        def train(arm, lr, steps="", recipe="", train_seed=""):
            return train_one(arm, float(lr), at_steps(a, steps or None), recipe, int(train_seed) if train_seed else None)

        return one_piece(a.one, {"train": train,
                                  "eval": lambda m, d, n="": eval_one(m, d, a, n), "gsm8k": lambda: gsm8k_one(a)})
    need_smollm2(BASE)
    t0, load0 = time.time(), os.getloadavg()
    piece = Pieces(a.results)
    saved = piece.saved
    tag = f"s{a.steps}-seed{a.seed}"
    _, _, test = data(a.seed)

    piece("before/test", child, ["eval", str(BASE), str(test)], a)
    for arm in ARMS:
        cands = CANDIDATES[arm]
        for lr, recipe in cands:
            piece(f"train/{arm}/{cand(lr, recipe)}/{tag}", child, ["train", arm, str(lr), "", recipe], a)
        # exact match on validation; a tie goes to the earlier candidate (the smaller lr, the first recipe)
        best = max(cands, key=lambda c: (saved[f"train/{arm}/{cand(*c)}/{tag}"]["val_after"]["exact_match"],  # noqa: B023
                                         -cands.index(c)))  # noqa: B023
        saved[f"chosen/{arm}/{tag}"] = list(best)
        judge(piece, "", f"{arm}/{cand(*best)}/{tag}", run_dir(arm, best[0], a, best[1]), best[1], test, a)
    lr, recipe = chosen(saved, "grpo", tag)
    if a.longer:
        longer, ltag, lrec = at_steps(a, a.longer), f"s{a.longer}-seed{a.seed}", a.longer_recipe or recipe
        piece(f"longer/train/grpo/{cand(lr, lrec)}/{ltag}", child, ["train", "grpo", str(lr), str(a.longer), lrec], a)
        judge(piece, "longer/", f"grpo/{cand(lr, lrec)}/{ltag}", run_dir("grpo", lr, longer, lrec), lrec, test, a)
    # The run the shipped job takes: among the chosen run and every longer one, validation exact at NEW_TOKENS (where a
    # reply a smaller budget cut after the number counts only if the model ends it there); a tie goes to fewer steps.
    _, val, _ = data(a.seed)
    runs = [f"grpo/{cand(lr, recipe)}/{tag}"] + [k.removeprefix("longer/train/") for k in longer_keys(saved, a)]
    for key in runs:
        piece(f"{prefix_of(saved, key)}val{NEW_TOKENS}/{key}", child,
              ["eval", str(run_dir_of(key, a)), str(val), str(NEW_TOKENS)], a)
    ship = saved[f"shipped/grpo/{tag}"] = max(runs, key=lambda k: (val16(saved, k)["exact_match"], -key_steps(k)))
    for key, seeds in ((ship, a.shipped_seeds), (runs[0], a.train_seeds)):
        for ts in (int(x) for x in seeds.split(",") if x):
            retrain(piece, key, ts, test, a)
    if a.gsm8k_steps:
        piece(f"gsm8k/s{a.gsm8k_steps}-seed{a.seed}", child, ["gsm8k"], a)
    piece.save()
    write_markdown(saved, a, stamp(t0, load0))


def judge(piece, prefix: str, key: str, run: Path, recipe: str, test: Path, a) -> None:
    """The test split on `run` (pieces `{prefix}test/{key}`), at its own job's budget and, where its recipe names a
    smaller one, at the untouched model's too (`{prefix}test16/{key}`): exact match strips the reply, so a reply cut
    after the number and a blank counts where 16 tokens might let it go on."""
    piece(f"{prefix}test/{key}", child, ["eval", str(run), str(test)], a)
    if RECIPES[recipe][2]:
        piece(f"{prefix}test{NEW_TOKENS}/{key}", child, ["eval", str(run), str(test), str(NEW_TOKENS)], a)


def retrain(piece, key: str, ts: int, test: Path, a) -> None:
    """GRPO run `key` trained again with training seed `ts` (pieces `seeds/.../{key}-train{ts}`), judged as `judge`."""
    lr, recipe, steps = key_parts(key)
    again = f"{key}-train{ts}"
    piece(f"seeds/train/{again}", child, ["train", "grpo", str(lr), str(steps), recipe, str(ts)], a)
    judge(piece, "seeds/", again, run_dir("grpo", lr, at_steps(a, steps), recipe, ts), recipe, test, a)


def prefix_of(saved: dict, key: str) -> str:
    """Where GRPO run `key`'s pieces are kept: "" (a candidate at --steps) or "longer/" (a --longer run)."""
    return "" if f"train/{key}" in saved else "longer/"


def key_parts(key: str) -> tuple[float, str, int]:
    """(lr, recipe, steps) of a GRPO run's key `grpo/lr<lr>[-<recipe>]/s<steps>-seed<seed>`."""
    lr, _, recipe = key.split("/")[1].removeprefix("lr").partition("-")
    return float(lr), recipe, key_steps(key)


def key_steps(key: str) -> int:
    return int(key.rsplit("/s", 1)[1].split("-")[0])


def run_dir_of(key: str, a) -> Path:
    lr, recipe, steps = key_parts(key)
    return run_dir("grpo", lr, at_steps(a, steps), recipe)


def longer_keys(saved: dict, a) -> list[str]:
    """The longer runs' train pieces, by steps."""
    return sorted((k for k in saved if k.startswith("longer/train/grpo/") and k.endswith(f"-seed{a.seed}")),
                  key=key_steps)


def val16(saved: dict, key: str) -> dict:
    """The validation split judged at NEW_TOKENS for GRPO run `key`."""
    return saved[f"{prefix_of(saved, key)}val{NEW_TOKENS}/{key}"]


def judged(saved: dict, prefix: str, key: str) -> tuple[dict | None, dict | None]:
    """What `judge` measured: (at the run's own budget, at NEW_TOKENS or None)."""
    return saved.get(f"{prefix}test/{key}"), saved.get(f"{prefix}test{NEW_TOKENS}/{key}")


def chosen(saved: dict, arm: str, tag: str) -> tuple[float, str] | None:
    """The (lr, recipe) validation chose for `arm`."""
    got = saved.get(f"chosen/{arm}/{tag}")
    return None if got is None else (float(got[0]), got[1])


def seeds_section(saved: dict, key: str, what: str, title: str) -> list[str]:
    """The markdown of GRPO run `key` and its retrainings with other training seeds."""
    prefix = prefix_of(saved, key)
    again = sorted(k.removeprefix("seeds/train/") for k in saved if k.startswith(f"seeds/train/{key}-train"))
    if not again:
        return []
    rows = [(f"{key.rsplit('-seed', 1)[1]} (the run above)", saved[f"{prefix}train/{key}"], *judged(saved, prefix, key))]
    rows += [(k.rsplit("-train", 1)[1], saved[f"seeds/train/{k}"], *judged(saved, "seeds/", k)) for k in again]
    scores = [te["exact_match"] for _, _, te, _ in rows if te]
    mean, sd = statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else float("nan")
    lines = [
        "",
        f"## {title} with other training seeds",
        "",
        f"{what}, trained again from the untouched model with another `train.seed` (data order and sampling; the "
        f"same fit and validation split); no new choice. Test exact over the {len(scores)} seeds: {mean:.3f} +- "
        f"{sd:.3f} (mean +- sd).",
        "",
        f"| train seed | train s | val exact after | test exact after | test exact at {NEW_TOKENS} tokens "
        "| GRPO sampled exact share, first -> last fifth of steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, tr, te, wide in rows:
        lines.append(f"| {name} | {tr['train_seconds']:.0f} | {tr['val_after']['exact_match']:.3f} "
                     f"| {te['exact_match'] if te else float('nan'):.3f} "
                     f"| {wide['exact_match'] if wide else float('nan'):.3f} "
                     f"| {tr['first_reward_exact_match']:.3f} -> {tr['last_reward_exact_match']:.3f} |")
    return lines


def write_markdown(saved: dict, a, stamped: str) -> None:
    tag = f"s{a.steps}-seed{a.seed}"
    before, g, new = saved["before/test"], grpo_job().group_size, NEW_TOKENS
    lines = [
        "# `grpo` on SmolLM2-135M-Instruct: answer-only two-digit sums, beside the SFT control "
        "(benchmarks/grpo_smollm2.py)",
        "",
        f"Written by {stamped}",
        "",
        f"The prompt: \"{QUESTION}\" for 10 <= a, b <= 99, the instruct model's chat template; {TEST_SUMS} sums held "
        f"out for the test, {VAL_SUMS} for validation, neither trained on. Judged by greedy decoding ({new} new tokens): "
        "*exact* is the stripped completion equal to the sum; *numeric* its last number equal to the sum. No SFT "
        f"warm start. GRPO (`jobs/grpo_arith_smollm2.yaml`): LoRA r 16 on all linear layers, G = {g}, temperature "
        f"1.0, beta 0 (no reference), {a.steps} steps of {PROMPTS_PER_STEP} prompts; reward 1 exact + 0.5 numeric + "
        "*w* for a completion that is one number (the format term); the recipe, *w* and whether the group-centred "
        "rewards are divided by the group's standard deviation (`method.scale_rewards`, on unless the row says *no "
        "std scaling*), a generation budget where the row names one (in training and in evaluation), whether cut "
        "replies are masked, and *closeness* c where the row names it (+ c x (1 - the last number's error relative to "
        "the sum, floored at 0): partial credit for a near number), is a candidate beside the lr. SFT control (`jobs/sft_chat_smollm2.yaml`, the same adapter): "
        f"{sft_steps(a)} steps of {PROMPTS_PER_STEP} labelled rows, as many rows as GRPO sampled completions "
        f"({a.steps} x {PROMPTS_PER_STEP} x {g}). Both trained by the in-process loop (one worker, DeepSpeed ZeRO-2 on "
        "one process, fp32, 2 CPUs). Learning rate (and GRPO's recipe) chosen by exact match on validation (a tie goes "
        "to the candidate listed first in the validation table), then the chosen run judged once on the test split.",
        "",
        "| arm | lr, recipe (chosen on validation) | steps | examples | train s | test exact before | test exact after "
        "| test numeric before | test numeric after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        best = chosen(saved, arm, tag)
        if best is None:
            continue
        tr, after = saved[f"train/{arm}/{cand(*best)}/{tag}"], saved[f"test/{arm}/{cand(*best)}/{tag}"]
        n = tr.get("completions", tr["steps"] * PROMPTS_PER_STEP)
        what = "sampled completions" if arm == "grpo" else "labelled rows"
        lines.append(f"| {arm} | {show(arm, *best)} | {tr['steps']} | {n} {what} | {tr['train_seconds']:.0f} "
                     f"| {before['exact_match']:.3f} | {after['exact_match']:.3f} "
                     f"| {before['numeric_match']:.3f} | {after.get('numeric_match', float('nan')):.3f} |")
    best = chosen(saved, "grpo", tag)  # every GRPO section below is about this run
    chosen_key = best and f"grpo/{cand(*best)}/{tag}"
    wide = best and judged(saved, "", chosen_key)[1]
    if wide:
        lines += ["", f"The chosen GRPO run generates {RECIPES[best[1]][2]} new tokens, as its job says. Judged at "
                  f"{NEW_TOKENS}, the untouched model's budget, on the same test split: exact {wide['exact_match']:.3f}, "
                  f"numeric {wide['numeric_match']:.3f}. (Exact match is the stripped reply equal to the sum, so a reply "
                  "cut after the number and a blank would count where a longer budget might let it go on.)"]
    lines += [
        "",
        "SFT's evaluation reports exact match only (`sft`'s `method.exact_match`); its numeric column is blank (nan).",
        "",
        "## Validation (the split the learning rate and recipe are chosen on)",
        "",
        "| arm | lr, recipe | train s | final train loss | val exact before | val exact after | val numeric after "
        "| val answer NLL before -> after | GRPO sampled exact share, first -> last fifth of steps "
        "| sampled numeric share | sampled one-number share | completion tokens | sampled share cut by the budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for c in CANDIDATES[arm]:
            tr = saved.get(f"train/{arm}/{cand(*c)}/{tag}")
            if tr is None:
                continue
            roll = " | | | | "
            if arm == "grpo":
                roll = " | ".join(f"{tr[f'first_{k}']:.{d}f} -> {tr[f'last_{k}']:.{d}f}" if f"first_{k}" in tr
                                  else "not logged then" for k, d in (
                    ("reward_exact_match", 3), ("reward_numeric_match", 3), ("reward_format", 3), ("completion_len", 1),
                    ("truncated", 3)))
            lines.append(f"| {arm} | {show(arm, *c)} | {tr['train_seconds']:.0f} | {tr['final_loss']:.4f} "
                         f"| {tr['val_before']['exact_match']:.3f} | {tr['val_after']['exact_match']:.3f} "
                         f"| {tr['val_after'].get('numeric_match', float('nan')):.3f} "
                         f"| {tr['val_before']['eval_loss']:.3f} -> {tr['val_after']['eval_loss']:.3f} | {roll} |")
    lines += ["", "*Answer NLL*: the loss of the reference answer's tokens (each method's own eval_loss: `grpo` ends the "
              "answer with EOS, `sft` with the chat template's end of turn, so the arms' figures do not compare). A "
              "GRPO run whose NLL jumps has left the answers behind: at lr 1e-3 every greedy answer on validation is "
              "one number (reward 0.5 each) and none is the sum. *w* 0.1 under the std scaling goes the same way: in a "
              "group where no completion is right the format term is the only spread, and the scaling gives it the "
              "advantage a right answer would get. *Cut by the budget*: the completions that used every new token "
              "without ending the turn (logged since `method.mask_truncated_completions` was added; a recipe marked "
              "*cut replies masked* leaves them out of the loss, as TRL's option does, though their rewards still "
              "count in their groups' advantages)."]
    gr = best and saved.get(f"train/{chosen_key}")
    if gr:
        lines += ["", f"GRPO step time of the chosen run: {gr['train_seconds'] / gr['steps']:.1f} s, of which "
                  f"{100 * gr['last_generate_share']:.0f} % generating in the last fifth of the steps "
                  f"({100 * gr['first_generate_share']:.0f} % in the first, when completions were longer)."]
    if best:
        lines += seeds_section(saved, chosen_key, f"The chosen lr and recipe ({show('grpo', *best)}), {a.steps} steps",
                               "The chosen GRPO run")
    longer = longer_keys(saved, a)
    if longer:
        sft = saved[f"test/sft/{cand(*chosen(saved, 'sft', tag))}/{tag}"]["exact_match"]
        lines += [
            "",
            "## GRPO run longer",
            "",
            f"The lr and recipe validation chose at {a.steps} steps, trained again from the untouched model for more "
            "steps (`--longer`; no new choice, and the test split is judged once per length; a row whose recipe is not "
            "the table's choice now was run before validation's candidates included the others, or named by "
            "`--longer-recipe`). The SFT control is "
            "not rerun: at as many labelled rows as the shorter GRPO run sampled it is at "
            f"{sft:.3f} on the test split. The lr decays by a cosine over each run's own steps (`train.lr_schedule`), "
            "so a longer run holds a large lr for longer. *Completion tokens* near 2 with a one-number share near 1 (at "
            "*w* 0.5): the policy answers every prompt with a two-digit number, which the format term pays 0.5 "
            "whatever its value, and a group whose completions all score the same has no advantage to learn from. "
            f"*at {NEW_TOKENS} tokens*: a run whose recipe generates fewer, judged at the untouched model's budget "
            "too. Where that figure falls below its own budget's, the run learned replies that the cut makes exact: "
            "the reward pays a cut reply as it pays a finished one, so nothing rewards ending the turn; a recipe marked "
            "*cut replies masked* gives a cut reply no loss (`method.mask_truncated_completions`).",
            "",
            "| steps | lr, recipe | sampled completions | train s | val exact before -> after | test exact before -> after "
            "| test numeric after | GRPO sampled exact share, first -> last fifth of steps | sampled one-number share "
            "| completion tokens |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in longer:
            tr, (te, wide) = saved[k], judged(saved, "longer/", k.removeprefix("longer/train/"))
            lr = show("grpo", *key_parts(k.removeprefix("longer/train/"))[:2])
            at16 = f" ({wide['exact_match']:.3f} at {NEW_TOKENS} tokens)" if wide else ""  # a smaller budget's run
            test = (f"{before['exact_match']:.3f} -> {te['exact_match']:.3f}{at16} | {te['numeric_match']:.3f}" if te
                    else "not judged | ")
            lines.append(
                f"| {tr['steps']} | {lr} | {tr['completions']} | {tr['train_seconds']:.0f} "
                f"| {tr['val_before']['exact_match']:.3f} -> {tr['val_after']['exact_match']:.3f} | {test} "
                f"| {tr['first_reward_exact_match']:.3f} -> {tr['last_reward_exact_match']:.3f} "
                f"| {tr['first_reward_format']:.3f} -> {tr['last_reward_format']:.3f} "
                f"| {tr['first_completion_len']:.1f} -> {tr['last_completion_len']:.1f} |")
    ship = saved.get(f"shipped/grpo/{tag}")
    if ship:
        runs = [chosen_key] + [k.removeprefix("longer/train/") for k in longer]
        lines += [
            "",
            "## The run the shipped job takes",
            "",
            f"Among the chosen run and every longer run above: validation exact at {NEW_TOKENS} new tokens, the "
            "untouched model's budget, where a reply that a smaller budget cut after the number counts only if the "
            "model ends its turn there (a tie goes to fewer steps). The test split is not read for this choice; its "
            "figures are those of the tables above. `jobs/grpo_arith_smollm2.yaml` takes the chosen run's lr, recipe "
            "and steps.",
            "",
            f"| steps | lr, recipe | val exact at its own budget | val exact at {NEW_TOKENS} tokens | test exact at its "
            f"own budget | test exact at {NEW_TOKENS} tokens |",
            "|---|---|---|---|---|---|",
        ]
        for k in runs:
            prefix = prefix_of(saved, k)
            tr, (te, wide) = saved[f"{prefix}train/{k}"], judged(saved, prefix, k)
            wide = wide or te  # a run at NEW_TOKENS already
            mark = " (shipped)" if k == ship else ""
            lines.append(f"| {key_steps(k)}{mark} | {show('grpo', *key_parts(k)[:2])} "
                         f"| {tr['val_after']['exact_match']:.3f} | {val16(saved, k)['exact_match']:.3f} "
                         f"| {te['exact_match']:.3f} | {wide['exact_match']:.3f} |")
    # every longer run trained again with other seeds, the shipped one first
    for k in sorted((k.removeprefix("longer/train/") for k in longer), key=lambda k: k != ship):
        what = f"The {'shipped ' if k == ship else ''}run ({show('grpo', *key_parts(k)[:2])}, {key_steps(k)} steps)"
        title = "The shipped GRPO run" if k == ship else f"The {key_steps(k)}-step run, {key_parts(k)[1]},"
        lines += seeds_section(saved, k, what, title)
    for k in sorted(k for k in saved if k.startswith("gsm8k/")):
        g = saved[k]
        b, af = g["before"], g["after"]
        lines += [
            "",
            f"## `jobs/grpo_gsm8k.yaml` on SmolLM2 ({g['steps']} steps)",
            "",
            f"The shipped job with `model.path` SmolLM2 and one in-process worker: GSM8K word problems as "
            f"`prompt_completion` (the question as is, no chat template), G = {g['group_size']}, "
            f"{g['max_new_tokens']} new tokens, reward 1 when the last number is the answer, lr {g['lr']:g}, "
            f"{g['prompts_per_step']} prompts a step. Judged on the first {g['eval_rows']} GSM8K test problems, greedy, "
            f"the same {g['max_new_tokens']} tokens (too few for most worked solutions: the figure is what this budget "
            "gives, not the model's GSM8K score).",
            "",
            "| steps | train s | test numeric match before | after | answer NLL before | after | sampled reward by step "
            "| generating share | mean completion tokens |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {g['steps']} | {g['train_seconds']:.0f} | {b['numeric_match']:.3f} | {af['numeric_match']:.3f} "
            f"| {b['eval_loss']:.3f} | {af['eval_loss']:.3f} | {' '.join(f'{x:.2f}' for x in g['sampled_reward'])} "
            f"| {100 * g['generate_share']:.0f} % | {g['completion_len']:.1f} |",
        ]
    lines += ["", "Measured by (each piece's total includes its wait for the lock):", ""]
    lines += [f"- `{k}`: {v['stamp']}" for k, v in saved.items() if isinstance(v, dict) and "stamp" in v
              and (tag in k or k == "before/test" or k.startswith(("gsm8k/", "longer/", "seeds/")))]
    out = Path(a.results).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
