"""A real pre-trained decoder, SmolLM2-135M-Instruct, fine-tuned by the shipped jobs/*_smollm2.yaml (2 Ray workers,
CPU) and judged on the shared test split against the untouched model: QA exact match and F1, chrF and BLEU per
language pair, chat held-out loss, Rust-book held-out perplexity. Writes benchmarks/results/real_model.md whole.

    ftray models get smollm2-135m-instruct runs/smollm2
    python benchmarks/real_model.py [--only JOB,...] [--skip-train] [--rows N] [--lock FILE]

Each job trains as `ftray train jobs/<job>.yaml` (a completed run folder is kept, not retrained; `--lock FILE`
runs each under `flock FILE`, where one Ray user at a time is the rule). Generation-based metrics: greedy answers
to the first `--rows` test rows (the method's own `greedy_answers`), from the untouched base and from the run;
loss and perplexity: the run's own held-out evaluation before and after training (run.json). The adapters of
RELOAD are then loaded in a fresh process with `PeftModel.from_pretrained` over runs/smollm2
(tests/_reload_eval.py), whose held-out loss must equal the one the run reported. Figures are kept per job in
benchmarks/results/real_model.json (with the stamp of the run that measured them); the .md is written whole from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import string
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import done, ftray, record, stamp  # noqa: E402

BASE = ROOT / "runs" / "smollm2"
BASE_ANSWERS = ROOT / "runs" / "real-model-base-answers"
# job -> how it is judged: `qa` (exact match, F1), `translation` (chrF, BLEU), `loss` / `perplexity` (run.json)
JOBS = {
    "sft_qa_smollm2": "qa",
    "sft_translate_en_fr_smollm2": "translation",
    "sft_translate_en_de_smollm2": "translation",
    "sft_chat_smollm2": "loss",
    "cpt_rust_smollm2": "perplexity",
    "sft_full_zero3_smollm2": "qa",
}
NEW_TOKENS = {"qa": 32, "translation": 64}
RELOAD = ("sft_qa_smollm2", "cpt_rust_smollm2")
RELOAD_TOLERANCE = 1e-3  # held-out loss, fresh process (one example at a time) vs the run's 2 ranks (padded batches)


def _normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(answers: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and token F1 (each the best over a question's gold answers), in percent."""
    em = [max(float(_normalize(a) == _normalize(g)) for g in gs) for a, gs in zip(answers, golds, strict=True)]
    f1 = [max(_f1(a, g) for g in gs) for a, gs in zip(answers, golds, strict=True)]
    return {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


def translation_scores(answers: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu

    hyp = [a.strip() for a in answers]
    return {"chrf": sacrebleu.corpus_chrf(hyp, [refs]).score, "bleu": sacrebleu.corpus_bleu(hyp, [refs]).score}


def generate(spec, path: Path, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers of `path` (the untouched base, or a run folder) to the prompts of `rows`."""
    import torch

    from ftray.data.encode import ensure_chat_template
    from ftray.methods import EvalContext, load_run_model
    from ftray.methods.sft import greedy_answers
    from ftray.models.load import load_tokenizer, resolve

    resolved = resolve(str(path))
    tok = load_tokenizer(resolved.tokenizer, False)
    ensure_chat_template(tok)
    model = load_run_model(spec, resolved, torch.float32).eval()
    return greedy_answers(model, tok, rows, max_new_tokens, EvalContext())


def held_out(spec, n: int) -> tuple[list[dict], list[dict]]:
    """The first `n` test rows as the job reads them (checked, columns applied) and as the file has them."""
    from ftray.data.rows import iter_rows, read_checked

    rows = read_checked(spec.data.eval, spec.data.format, columns=spec.data.columns, limit=n).rows
    raw = [r for _, (_, r) in zip(range(len(rows)), iter_rows(spec.data.eval), strict=False)]
    return rows, raw


def base_answers(spec, kind: str, rows: list[dict]) -> list[str]:
    """The untouched model's answers, which depend only on the prompts: kept in runs/ for the jobs that share them
    (and computed ahead with `--base-only` while the runs train)."""
    key = [spec.data.eval, spec.data.columns, len(rows), NEW_TOKENS[kind]]
    cached = BASE_ANSWERS / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(generate(spec, BASE, rows, NEW_TOKENS[kind])))
    return json.loads(cached.read_text())


def judge(job: str, kind: str, n: int) -> dict:
    from ftray.config import load_spec
    from ftray.data.encode import render_prompt
    from ftray.models.load import load_tokenizer

    spec = load_spec(ROOT / "jobs" / f"{job}.yaml")
    run = ROOT / spec.output.dir
    rec = record(run)
    train = rec["train"]
    out = {
        "job": job, "kind": kind, "method": spec.method.kind, "adapter": spec.adapter.kind,
        "zero_stage": spec.deepspeed.zero_stage, "steps": train["steps"], "train_seconds": train["train_seconds"],
        "trained_tokens": train["trained_tokens"], "tokens_per_s": train.get("process_trained_tokens", train["trained_tokens"]) / train["train_seconds"],
        "wall_seconds": rec["timings"]["total_s"],
        "eval_before": rec["eval"]["before"], "eval_after": rec["eval"]["after"],
    }
    if kind in ("loss", "perplexity"):
        key = "eval_loss" if kind == "loss" else "perplexity"
        out["metrics"] = {key: (rec["eval"]["before"][key], rec["eval"]["after"][key])}
        out["rows"] = spec.data.eval_max_rows
        return out
    rows, raw = held_out(spec, n)
    t0 = time.time()
    before = base_answers(spec, kind, rows)
    after = generate(spec, run, rows, NEW_TOKENS[kind])
    if kind == "qa":
        golds = [r["answers"]["text"] or [r["answer"]] for r in raw]
        sb, sa = squad_scores(before, golds), squad_scores(after, golds)
        refs = [g[0] for g in golds]
    else:
        tok = load_tokenizer(str(BASE), False)
        refs = [render_prompt(tok, r)[1] for r in rows]
        sb, sa = translation_scores(before, refs), translation_scores(after, refs)
    out["metrics"] = {k: (sb[k], sa[k]) for k in sb}
    out["rows"] = len(rows)
    out["eval_seconds"] = time.time() - t0
    out["samples"] = [
        {"ref": ref, "before": b, "after": a} for ref, b, a in zip(refs[:3], before[:3], after[:3], strict=True)
    ]
    return out


def reload_check(jobs: list[str]) -> list[dict]:
    """Held-out loss of each run's adapter loaded with PeftModel.from_pretrained in a fresh process."""
    from ftray.config import load_spec

    runs = {j: ROOT / load_spec(ROOT / "jobs" / f"{j}.yaml").output.dir for j in jobs}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_reload_eval.py"), str(BASE), *map(str, runs.values())],
        check=True, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    fresh = {json.loads(line)["run"]: json.loads(line)["eval_loss"] for line in proc.stdout.splitlines() if line.startswith("{")}
    out = []
    for j, run in runs.items():
        reported = record(run)["eval"]["after"]["eval_loss"]
        out.append({"job": j, "reported": reported, "fresh": fresh[str(run)], "diff": abs(fresh[str(run)] - reported)})
    return out


BETTER_LOWER = {"eval_loss", "perplexity"}
LABEL = {"exact_match": "exact match (%)", "f1": "F1 (%)", "chrf": "chrF", "bleu": "BLEU", "eval_loss": "held-out loss",
         "perplexity": "held-out perplexity"}


def write_markdown(saved: dict, path: Path, stamped: str) -> None:
    """The whole file from real_model.json: the stamp of the run writing it under the title; each job keeps the
    stamp of the script run that measured it (a run with `--only` measures some and keeps the others)."""
    results = [saved["jobs"][j] for j in JOBS if j in saved["jobs"]]
    reload = [saved["reload"][j] for j in JOBS if j in saved.get("reload", {})]
    missing = [j for j in JOBS if j not in saved["jobs"]]
    n = max((r["rows"] for r in results if r["kind"] in NEW_TOKENS), default=0)
    lines = [
        "# SmolLM2-135M-Instruct fine-tuned by the shipped jobs, against the untouched model",
        "",
        f"Written by {stamped}",
        "",
        "Each job is `ftray train jobs/<job>.yaml` (2 Ray workers on this 2-CPU machine, DeepSpeed, fp32) from "
        "`runs/smollm2` (`ftray models get smollm2-135m-instruct`). The untouched base and the fine-tuned run are judged "
        f"on the same held-out rows of the shared test split: QA and translation on the first {n} test rows by greedy "
        "answers (SQuAD-normalised exact match and token F1, best over the gold answers; corpus chrF and BLEU through "
        "sacrebleu), chat and the Rust book by the run's own held-out evaluation before and after training (loss on the "
        "assistant turns of all 20 test conversations; perplexity on the first 200 test paragraphs). Hyperparameters "
        "are the YAMLs' (set before the runs, not tuned; no test-split choice). Tokens/s: the run's trained (non-pad) "
        "tokens over its training seconds; job wall: the whole `ftray train` (Ray start, data, both evaluations, save).",
        "",
        "| job | method | metric | untouched | fine-tuned | change | improved | steps | train s | job wall s | trained tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        how = f"{r['method']} + {r['adapter']}, ZeRO-{r['zero_stage']}"
        for k, (b, a) in r["metrics"].items():
            better = a < b if k in BETTER_LOWER else a > b
            lines.append(
                f"| `{r['job']}` | {how} | {LABEL[k]} | {b:.2f} | {a:.2f} | {a - b:+.2f} | {'yes' if better else '**no**'} | "
                f"{r['steps']} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['tokens_per_s']:.0f} |"
            )
    lines += ["", "Held-out loss (target tokens: the answers for sft, every token for causal_lm; the run's own evaluation on `data.eval_max_rows` rows) before -> after:", ""]
    lines += [f"- `{r['job']}`: {r['eval_before']['eval_loss']:.3f} -> {r['eval_after']['eval_loss']:.3f}" for r in results]
    if reload:
        lines += [
            "",
            "## The saved adapter in a fresh process",
            "",
            "`tests/_reload_eval.py`: a new Python process loads `runs/smollm2` with `AutoModelForCausalLM.from_pretrained` "
            "and the run's `adapter/` with `PeftModel.from_pretrained`, and computes the held-out loss over the run's "
            "prepared eval split one example at a time; the run reported it from its 2 ranks (padded batches). Same "
            f"means within {RELOAD_TOLERANCE:g}.",
            "",
            "| job | held-out loss the run reported | fresh process | difference | same |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{c['job']}` | {c['reported']:.6f} | {c['fresh']:.6f} | {c['diff']:.1e} | "
            f"{'yes' if c['diff'] < RELOAD_TOLERANCE else '**no**'} |"
            for c in reload
        ]
    samples = [r for r in results if r.get("samples")]
    if samples:
        lines += ["", "## First held-out answers", "", "| job | reference | untouched | fine-tuned |", "|---|---|---|---|"]
        for r in samples:
            for s in r["samples"]:
                cells = [s["ref"], s["before"], s["after"]]
                cells = [" ".join(c.split()).replace("|", "\\|")[:160] for c in cells]
                lines.append(f"| `{r['job']}` | {cells[0]} | {cells[1]} | {cells[2]} |")
    lines += ["", "Measured by:", ""] + [f"- `{r['job']}`: {r['stamp']}" for r in results]
    lines += [f"- fresh-process check of `{c['job']}`: {c['stamp']}" for c in reload]
    if missing:
        from ftray.config import load_spec

        def why(j: str) -> str:
            run = ROOT / load_spec(ROOT / "jobs" / f"{j}.yaml").output.dir
            return "its run completed, not yet judged" if done(run) else "no completed run"

        lines += ["", "Not measured: " + "; ".join(f"`{j}` ({why(j)})" for j in missing) + "."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default=",".join(JOBS))
    p.add_argument("--skip-train", action="store_true", help="evaluate the completed runs, train nothing")
    p.add_argument("--rows", type=int, default=40, help="held-out rows for the generation-based metrics")
    p.add_argument("--lock", default=None, help="run each `ftray train` under `flock LOCK`")
    p.add_argument("--reload", default=",".join(RELOAD), help="jobs whose adapter is checked in a fresh process")
    p.add_argument("--base-only", action="store_true", help="only compute the untouched model's answers (no runs)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "real_model.json"))
    args = p.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    if not (BASE / "config.json").exists():
        sys.exit(f"{BASE}: missing; `ftray models get smollm2-135m-instruct runs/smollm2` writes it")
    jobs = [j for j in args.only.split(",") if j]
    from ftray.config import load_spec

    if args.base_only:
        for job in (j for j in jobs if JOBS[j] in NEW_TOKENS):
            spec = load_spec(ROOT / "jobs" / f"{job}.yaml")
            print(f"untouched answers for {job}", flush=True)
            base_answers(spec, JOBS[job], held_out(spec, args.rows)[0])
        return

    for job in jobs:
        run = ROOT / load_spec(ROOT / "jobs" / f"{job}.yaml").output.dir
        if not args.skip_train and not done(run):
            ftray("train", f"jobs/{job}.yaml", lock=args.lock)
    ready = [j for j in jobs if done(ROOT / load_spec(ROOT / "jobs" / f"{j}.yaml").output.dir)]
    results_path = Path(args.results)

    def save(section: str, key: str, value: dict) -> dict:
        """Merge one figure into the results file as it is now (another run with `--only` may have added some)."""
        saved = json.loads(results_path.read_text()) if results_path.exists() else {"jobs": {}, "reload": {}}
        saved[section][key] = value
        results_path.write_text(json.dumps(saved, indent=1))
        return saved

    for job in ready:
        print(f"judging {job}", flush=True)
        t_job, load_job = time.time(), os.getloadavg()
        save("jobs", job, {**judge(job, JOBS[job], args.rows), "stamp": stamp(t_job, load_job)})
    checks = [j for j in args.reload.split(",") if j in ready]
    if checks:
        t_check, load_check = time.time(), os.getloadavg()
        for c in reload_check(checks):
            save("reload", c["job"], {**c, "stamp": stamp(t_check, load_check)})
    saved = json.loads(results_path.read_text()) if results_path.exists() else {"jobs": {}, "reload": {}}
    md = results_path.with_suffix(".md")
    write_markdown(saved, md, stamp(t0, load0))
    print(md.read_text())


if __name__ == "__main__":
    main()
