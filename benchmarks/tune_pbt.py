"""Population based training as a user runs it: `ftray tune jobs/sweep_pbt.yaml` after `make quickstart-tiny`'s
model and data, on an embedded local Ray. Writes benchmarks/results/tune_pbt_sweep.md whole: this script's stamp,
then the sweep's own results.md (its table, each trial's exploits) and what each exploit's segments.json says.

    python benchmarks/tune_pbt.py [--lock FILE]

The tiny model and the arithmetic data are built as `make quickstart-tiny` builds them (runs/tiny-micro,
runs/data) when absent; the sweep folder runs/sweep-pbt is replaced. `--lock FILE` holds `flock FILE` around
the sweep (one CPU-heavy user at a time on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _cli import ftray, held, stamp  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "tune_pbt_sweep.md"
SWEEP = ROOT / "runs" / "sweep-pbt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", default=None)
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    with held(args.lock):
        if not (ROOT / "runs" / "data" / "arith_train.jsonl").exists():
            ftray("data", "arithmetic", "runs/data")
        if not (ROOT / "runs" / "tiny-micro" / "config.json").exists():
            ftray("models", "tiny", "runs/tiny-micro", "--size", "micro", "--corpus", "runs/data/arith_train.jsonl")
        shutil.rmtree(SWEEP, ignore_errors=True)
        took = ftray("tune", "jobs/sweep_pbt.yaml")
    exploits = []
    for seg_file in sorted((SWEEP / "trials").glob("*/segments.json")):
        for seg in json.loads(seg_file.read_text())[1:]:
            if seg["from_trial"] and seg["from_trial"] != seg_file.parent.name:
                cfg = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in seg["config"].items())
                exploits.append(f"- trial {seg_file.parent.name} continued {seg['from_trial']}'s checkpoint at step "
                                f"{seg['start_step']} with {cfg}")
    sweep_md = (SWEEP / "results.md").read_text().strip().splitlines()
    lines = [
        "# PBT sweep: `ftray tune jobs/sweep_pbt.yaml`",
        "",
        f"Written by {stamp(t0, load0)}.",
        "",
        f"The sweep took {took:.0f} s (Ray started and stopped inside it). Exploits, from each trial's segments.json:",
        "",
        *(exploits or ["- none"]),
        "",
        "The sweep's own results.md, as written:",
        "",
        *["#" + x if x.startswith("#") else x for x in sweep_md],
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
