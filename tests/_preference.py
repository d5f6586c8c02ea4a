"""A preference task a tiny model can learn in a few steps: for `a+b=`, the chosen reply is the sum and
the rejected one a wrong three-digit number (so length alone tells them apart)."""

from __future__ import annotations

import random
from pathlib import Path

from tests._methods_tiny import write_jsonl


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        row = {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(rng.randint(100, 999))}
        if i % 3 == 0:  # some rows carry an earlier turn
            row["history"] = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
        rows.append(row)
    return rows


def preference_task(folder: Path, n_train: int = 64, n_test: int = 32) -> tuple[Path, Path]:
    return (
        write_jsonl(folder / "train.jsonl", preference_rows(n_train, 0)),
        write_jsonl(folder / "test.jsonl", preference_rows(n_test, 1)),
    )
