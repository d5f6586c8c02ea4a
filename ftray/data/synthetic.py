"""A task the project generates itself, with answers that can be checked: small additions.

Rows are `prompt_completion`: {"prompt": "12+7=", "completion": "19"}. Train and test share no
prompt, so exact match on the test file measures more than memorisation. `write_arithmetic_preferences`
turns the same split into `preference` rows (the right sum chosen over a near miss), what a reward model
for the task learns from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["write_arithmetic", "write_arithmetic_preferences"]


def write_arithmetic(out_dir: str | Path, max_operand: int = 19, test_size: int = 60, seed: int = 0) -> tuple[Path, Path]:
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    test, train = pairs[:test_size], pairs[test_size:]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("test", test)):
        p = out / f"arith_{name}.jsonl"
        p.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n" for a, b in rows))
        paths.append(p)
    return paths[0], paths[1]


def write_arithmetic_preferences(
    out_dir: str | Path, max_operand: int = 19, test_size: int = 60, seed: int = 0, per_prompt: int = 3
) -> tuple[Path, Path]:
    """arith_pref_{train,test}.jsonl: {"prompt", "chosen": the sum, "rejected": the sum off by 1-10}, with
    `per_prompt` rejected answers per prompt, on the same train/test split as `write_arithmetic`."""
    tr, te = write_arithmetic(out_dir, max_operand=max_operand, test_size=test_size, seed=seed)
    rng = random.Random(seed + 1)
    paths = []
    for name, src in (("train", tr), ("test", te)):
        rows = []
        for line in src.read_text().split("\n"):
            if not line:
                continue
            r = json.loads(line)
            right = int(r["completion"])
            wrong = rng.sample([right + d for d in range(-10, 11) if d and right + d >= 0], per_prompt)
            rows += [{"prompt": r["prompt"], "chosen": str(right), "rejected": str(w)} for w in wrong]
        p = Path(out_dir) / f"arith_pref_{name}.jsonl"
        p.write_text("".join(json.dumps(x) + "\n" for x in rows))
        paths.append(p)
    return paths[0], paths[1]
