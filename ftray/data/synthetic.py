"""A task the project generates itself, with answers that can be checked: small additions.

Rows are `prompt_completion`: {"prompt": "12+7=", "completion": "19"}. Train and test share no
prompt, so exact match on the test file measures more than memorisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["write_arithmetic"]


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
