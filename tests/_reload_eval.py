"""Run in a fresh process: load each run's adapter with PeftModel.from_pretrained over the base and print
its held-out loss, one JSON line per run (one process for many runs: start-up is most of the cost).

Usage: python tests/_reload_eval.py BASE_MODEL RUN_DIR [RUN_DIR ...]
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ftray.data.prepare import load_split
from ftray.methods._lm import collate_tokens, lm_loss

base, *run_dirs = map(Path, sys.argv[1:])
for run in run_dirs:
    record = json.loads((run / "run.json").read_text())
    ev = load_split(record["data"]["path"], "eval")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    total = tokens = 0.0
    with torch.no_grad():
        for ids, labels in zip(ev["input_ids"], ev["labels"], strict=True):
            loss, info = lm_loss(model, collate_tokens([{"input_ids": ids, "labels": labels}], 0))
            total += float(loss) * info["target_tokens"]
            tokens += info["target_tokens"]
    print(json.dumps({"run": str(run), "eval_loss": total / tokens}), flush=True)
