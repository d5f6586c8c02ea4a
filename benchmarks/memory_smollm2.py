"""Peak memory of one training worker on SmolLM2-135M-Instruct, with and without `train.gradient_checkpointing`,
and of per-token log-probs through the selective log-softmax against a full-vocabulary fp32 `log_softmax`.

    python benchmarks/memory_smollm2.py [--steps 3] [--threads 2]

Each arm runs in a fresh process (a process's peak resident set only grows), and results go to
benchmarks/results/memory_smollm2.md, written whole with the stamp of this run:

- training: the shipped jobs `sft_qa_smollm2` (LoRA r 16, all linear layers, ZeRO-2) and `sft_full_zero3_smollm2`
  (every weight, ZeRO-3), `--steps` steps through the in-process loop (`ftray.train.local.run_local`: one worker,
  DeepSpeed on one process, the same micro-batch a worker of the 2-worker job takes), no held-out evaluation; the
  peak is what the loop records in run.json (`placement.ranks[].peak_memory_mb`: the worker's peak resident set on
  CPU, its peak allocated memory on a GPU);
- log-probs: a batch of fp32 logits [micro-batch, max_length, 49,152], requires grad, forward and backward of the
  summed per-token log-probs, through `ftray.methods.losses.token_logps` and through `log_softmax(-1).gather`; the
  peak resident set above the process's before the logits were made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOBS = {"lora": "jobs/sft_qa_smollm2.yaml", "full": "jobs/sft_full_zero3_smollm2.yaml"}
TRAIN_ARMS = [(kind, gc) for kind in JOBS for gc in (False, True)]
LOGP_ARMS = ("selective", "full")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_arm(kind: str, gc: bool, steps: int, out: Path) -> dict:
    """One arm, in this (fresh) process."""
    from ftray.config import load_spec
    from ftray.train.local import run_local

    spec = load_spec(ROOT / JOBS[kind], [
        f"output.dir={out}", f"train.max_steps={steps}", f"train.gradient_checkpointing={str(gc).lower()}",
        "data.eval=null", "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=1000",
    ])
    t0 = time.time()
    record = run_local(spec, log=lambda *a, **k: None)
    ranks = record["placement"]["ranks"]
    return {"arm": f"{kind}, gradient checkpointing {'on' if gc else 'off'}", "kind": kind, "gc": gc,
            "peak_mb": max(r["peak_memory_mb"] for r in ranks), "steps": record["train"]["steps"],
            "micro_batch": spec.train.micro_batch_size, "max_length": spec.data.max_length,
            "zero_stage": spec.deepspeed.zero_stage, "seconds": time.time() - t0,
            "final_loss": record["train"]["final_loss"]}


def logp_arm(how: str, rows: int, length: int) -> dict:
    import torch

    from ftray.methods.losses import token_logps
    from ftray.train.loop import _peak_memory_mb  # what run.json records for the training arms

    torch.manual_seed(0)
    vocab = 49152
    tokens = torch.randint(0, vocab, (rows, length))
    token_logps(torch.zeros(1, 2, vocab), tokens[:1, :2])  # imports and first-call allocations before the baseline
    before = _rss_mb()
    logits = (torch.randn(rows, length, vocab) * 3).requires_grad_(True)
    if how == "selective":
        lp = token_logps(logits, tokens)
    else:
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lp.sum().backward()
    return {"arm": f"per-token log-probs, {'selective log-softmax (token_logps)' if how == 'selective' else 'full log_softmax + gather'}",
            "how": how, "peak_above_mb": _peak_memory_mb(torch.device("cpu")) - before, "logits_mb": rows * length * vocab * 4 / 2**20,
            "checksum": float(lp.detach().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # an arm, in a child process
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "memory_smollm2.md"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.one:
        kind, _, arg = a.one.partition(":")
        if kind == "logp":
            print(json.dumps(logp_arm(arg, 2, 384)))
        else:
            with tempfile.TemporaryDirectory(prefix="ftray-mem-") as d:
                print(json.dumps(train_arm(kind, arg == "gc", a.steps, Path(d) / "run")))
        return

    from benchmarks._cli import stamp

    if not (ROOT / "runs" / "smollm2" / "config.json").exists():
        sys.exit("runs/smollm2 is missing: `ftray models get smollm2-135m-instruct runs/smollm2` first")
    t0, load0 = time.time(), os.getloadavg()
    results = []
    arms = [f"{k}:{'gc' if gc else 'nogc'}" for k, gc in TRAIN_ARMS] + [f"logp:{h}" for h in LOGP_ARMS]
    for arm in arms:
        cmd = [sys.executable, __file__, "--one", arm, "--steps", str(a.steps), "--threads", str(a.threads)]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        if proc.returncode or line is None:
            sys.exit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(line))
        print(line, flush=True)
    write(results, a, stamp(t0, load0))


def write(results: list[dict], a, stamped: str) -> None:
    train = {(r["kind"], r["gc"]): r for r in results if "kind" in r}
    logp = {r["how"]: r for r in results if "how" in r}
    lines = [
        "# Peak memory of a training worker on SmolLM2-135M-Instruct (benchmarks/memory_smollm2.py)",
        "",
        stamped,
        "",
        f"One worker in process (`run_local`: DeepSpeed on one process, fp32, CPU, {a.threads} torch threads), the "
        f"shipped job's micro-batch and `data.max_length`, {a.steps} steps, no held-out evaluation; each arm in a "
        "fresh process. Peak: the worker's peak resident set as the loop records it in run.json (model, optimizer "
        "state, activations, and the process's own libraries).",
        "",
        "| job | adapter, ZeRO | micro-batch x max_length | gradient checkpointing | peak MiB / worker | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, gc), r in sorted(train.items()):
        lines.append(f"| `{Path(JOBS[kind]).stem}` | {kind}, ZeRO-{r['zero_stage']} | {r['micro_batch']} x {r['max_length']} | "
                     f"{'on' if gc else 'off'} | {r['peak_mb']:.0f} | {r['final_loss']:.4f} |")
    lines.append("")
    for kind in JOBS:
        off, on = train.get((kind, False)), train.get((kind, True))
        if off and on:
            lines.append(f"- {kind}: gradient checkpointing on / off, peak per worker: {on['peak_mb'] / off['peak_mb']:.2f}x "
                         f"({off['peak_mb'] - on['peak_mb']:.0f} MiB less)")
    sel, full = logp.get("selective"), logp.get("full")
    if sel and full:
        lines += [
            "",
            f"Per-token log-probs of fp32 logits [2, 384, 49152] ({sel['logits_mb']:.0f} MiB), forward and backward, peak "
            "resident set above the process's before the logits were made (the logits and their gradient included):",
            "",
            "| path | peak MiB above |",
            "|---|---|",
            f"| selective log-softmax (`ftray.methods.losses.token_logps`) | {sel['peak_above_mb']:.0f} |",
            f"| full `log_softmax(-1).gather` | {full['peak_above_mb']:.0f} |",
            "",
            f"- selective / full: {sel['peak_above_mb'] / full['peak_above_mb']:.2f}x; the two sums of log-probs: "
            f"{sel['checksum']:.4f} and {full['checksum']:.4f}",
        ]
    out = Path(a.results)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
