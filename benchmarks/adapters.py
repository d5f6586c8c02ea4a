"""Every adapter kind on the same SFT job (the quickstart's arithmetic task, micro Llama, 2 CPU workers,
ZeRO-2): trainable parameters, peak memory per worker, tokens/s and held-out loss after N steps, written
to benchmarks/results/adapters.md (the README quotes it).

    python benchmarks/adapters.py [--steps 40] [--work runs/bench-adapters] [--kinds lora,ia3,...]

A run folder that already holds run.json is read, not run again.

Every run is `ftray train jobs/quickstart_tiny.yaml --set ...` as a user types it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import ROOT, ftray, stamp  # noqa: E402

# Per kind: the overrides beyond `adapter.kind` (the quickstart's LoRA fields do not apply to the others).
NOT_LORA = ["adapter.target_modules=null", "adapter.modules_to_save=null"]
KINDS: dict[str, list[str]] = {
    "full": ["adapter.target_modules=null", "adapter.modules_to_save=null", "train.lr=1e-3"],
    "lora": [],
    "lora+dora+rslora": ["adapter.kind=lora", "adapter.use_dora=true", "adapter.use_rslora=true"],
    "adalora": ["adapter.r=8", "adapter.init_r=16"],
    "ia3": NOT_LORA,
    "prefix": [*NOT_LORA, "data.packing=false", "adapter.num_virtual_tokens=16"],
    "prompt": [*NOT_LORA, "data.packing=false", "adapter.num_virtual_tokens=16"],
    "p_tuning": [*NOT_LORA, "data.packing=false", "adapter.num_virtual_tokens=16"],
    "llama_adapter": [*NOT_LORA, "adapter.num_virtual_tokens=16"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-adapters"))
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated names of KINDS")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapters.md"))
    a = ap.parse_args(argv)
    t0, load0 = time.time(), os.getloadavg()
    w = Path(a.work)
    data, model = w / "data", w / "tiny-micro"
    if not (data / "arith_train.jsonl").exists():
        ftray("data", "arithmetic", str(data))
    if not (model / "config.json").exists():
        ftray("models", "tiny", str(model), "--size", "micro", "--corpus", str(data / "arith_train.jsonl"))
    rows = []
    for name in a.kinds.split(","):
        kind = name.split("+")[0]
        run = w / name
        over = [f"model.path={model}", f"data.train={data / 'arith_train.jsonl'}", f"data.eval={data / 'arith_test.jsonl'}",
                f"adapter.kind={kind}", f"train.max_steps={a.steps}", "train.eval_every=null", "train.checkpoint_every=null",
                "method.exact_match=false", f"output.dir={run}", *KINDS[name]]
        if not (run / "run.json").exists():  # a finished run is kept: rerun with a fresh --work to redo it
            ftray("train", "jobs/quickstart_tiny.yaml", *[x for o in over for x in ("--set", o)])
        rec = json.loads((run / "run.json").read_text())
        wall = rec["timings"].get("total_s", float("nan"))
        t = rec["trainable"]
        mem = max(r.get("peak_memory_mb", 0.0) for r in rec["placement"]["ranks"])
        tok_s = rec["train"].get("process_trained_tokens", rec["train"]["trained_tokens"]) / max(rec["train"]["train_seconds"], 1e-9)
        rows.append(f"| {name} | {t['trainable_params']:,} ({t['trainable_pct']:.2f} %) | {mem:,.0f} | {tok_s:,.0f} | "
                    f"{rec['eval']['before']['eval_loss']:.3f} | {rec['eval']['after']['eval_loss']:.3f} | {wall:.0f} |")
    text = "\n".join([
        f"# Adapters on one SFT job ({a.steps} steps)",
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        "`jobs/quickstart_tiny.yaml` (arithmetic, micro Llama, 2 CPU workers, ZeRO-2, global batch 16) with each "
        "`adapter.kind`; prompt-family kinds unpacked (they refuse packing). The LoRA-family rows keep the quickstart's `modules_to_save` (embeddings and output layer of the random-init base trained in full); the others train only their own parameters. Peak memory: the larger of the two "
        "workers' peak resident set. tokens/s: trained (non-padding) tokens over training time.",
        "",
        "| adapter | trainable | peak MiB / worker | tokens/s | eval loss before | after | wall s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
