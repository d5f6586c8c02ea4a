"""The order a real decoder's own likelihood prefers, on the test windows of `sentence_order` (issue 18): how much
order signal WikiText-2's 3-sentence windows hold for a pre-trained language model that reads them whole, with no
training. Writes benchmarks/results/sentence_order_lm.md whole.

    ftray models get smollm2-135m-instruct runs/smollm2
    python benchmarks/sentence_order_lm.py [--windows 0] [--lock /tmp/ray.lock]

The windows are the method's own (`jobs/sentence_order_wikitext.yaml`'s test file, read as its rows, cut into
sentences and into consecutive windows of `method.n_sentences` by `ftray.methods.sentence_order`). For each window
every one of its n! orders is joined with a space and scored by SmolLM2-135M-Instruct (the causal LM, fp32, CPU) as
the sum of its tokens' log-probabilities; the order with the highest is the model's answer (a tie of k orders counts
1/k). The same text, tokens and window, so its accuracy sits beside `sentence_order.md`'s classifier and chance.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import held, need_smollm2, stamp  # noqa: E402

JOB = ROOT / "jobs" / "sentence_order_wikitext.yaml"
BASE = ROOT / "runs" / "smollm2"
OUT = ROOT / "benchmarks" / "results" / "sentence_order_lm.md"


def held_out_windows(test_file: Path, n: int) -> list[list[str]]:
    """The method's own windows of the test file's rows."""
    from ftray.data.rows import read_checked
    from ftray.methods.sentence_order import windows

    return [w for row in read_checked(str(test_file), "text").rows for _, w in windows(row["text"], n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=0, help="score the first N windows only (0: all)")
    ap.add_argument("--lock", default=None)
    a = ap.parse_args()
    need_smollm2(BASE)
    t0, load0 = time.time(), os.getloadavg()
    os.chdir(ROOT)
    import torch
    from transformers import AutoModelForCausalLM

    from ftray.config import load_spec
    from ftray.methods.losses import token_logps
    from ftray.models.load import load_tokenizer

    job = load_spec(JOB, [f"model.path={BASE}"])
    n = job.method.n_sentences
    test_file = (ROOT / job.data.eval).resolve()
    wins = held_out_windows(test_file, n)[: a.windows or None]
    orders = list(itertools.permutations(range(n)))
    with held(a.lock):
        torch.set_num_threads(os.cpu_count() or 1)
        tok = load_tokenizer(str(BASE))
        tok.padding_side = "right"
        model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
        t1 = time.time()
        right, lengths = 0.0, []
        for w in wins:
            enc = tok([" ".join(w[i] for i in o) for o in orders], return_tensors="pt", padding=True)
            with torch.no_grad():
                logp = token_logps(model(**enc).logits[:, :-1], enc["input_ids"][:, 1:])
            score = (logp * enc["attention_mask"][:, 1:]).sum(1)
            top = torch.isclose(score, score.max(), rtol=0, atol=1e-4)
            right += float(top[0]) / int(top.sum())  # orders[0] is the text's order
            lengths.append(int(enc["attention_mask"][0].sum()))
        score_s = time.time() - t1
    acc = right / len(wins)
    se = (acc * (1 - acc) / len(wins)) ** 0.5
    lines = [
        "# sentence_order: the order SmolLM2's own likelihood prefers (WikiText-2, 3 shuffled sentences, 6 orders)",
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        f"SmolLM2-135M-Instruct (`ftray models get smollm2-135m-instruct`), the causal LM as pre-trained, fp32, no "
        f"training. The test windows of `{JOB.relative_to(ROOT)}` ({test_file.name}: {len(wins)} windows of {n} "
        "consecutive sentences, cut as `sentence_order` cuts them); each window's "
        f"{len(orders)} orders joined with a space and scored by the sum of their tokens' log-probabilities "
        "(the first token unscored); the model's order is the likeliest (a tie of k orders counts 1/k).",
        "",
        "| | accuracy (the text's order chosen) |",
        "|---|---:|",
        f"| chance | {1 / len(orders):.3f} |",
        f"| SmolLM2's likelihood | {acc:.3f} (± {se:.3f} standard error) |",
        "",
        f"Mean window length {sum(lengths) / len(lengths):.0f} tokens; {score_s:.0f} s scoring "
        f"({score_s / len(wins):.2f} s a window of {len(orders)} orders). Beside it: the fine-tuned all-MiniLM-L6-v2 "
        "classifier of [sentence_order.md](sentence_order.md) and [sentence_order_pairwise.md]"
        "(sentence_order_pairwise.md) (issue 18's goal: 0.5).",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
