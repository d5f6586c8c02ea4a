"""A task the project generates itself, with answers that can be checked: small additions.

Rows are `prompt_completion`: {"prompt": "12+7=", "completion": "19"}; with `question` (e.g. "What is {a} + {b}?
Answer with the number only."), `chat` rows instead, the question a user turn and the sum the assistant's reply,
for an instruct model's chat template. Train and test share no prompt, so exact match on the test file measures
more than memorisation. `write_arithmetic_preferences`
turns the same split into `preference` rows (the right sum chosen over a near miss), what a reward model
for the task learns from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["write_arithmetic", "write_arithmetic_preferences"]


def _split(max_operand: int, test_size: int, seed: int, min_operand: int = 0) -> tuple[list, list]:
    """(train, test) operand pairs: every a+b with min_operand <= a, b <= max_operand, shuffled, the first test_size
    held out."""
    if not 0 <= min_operand <= max_operand:
        raise ValueError(f"operands: need 0 <= min_operand ({min_operand}) <= max_operand ({max_operand})")
    span = range(min_operand, max_operand + 1)
    pairs = [(a, b) for a in span for b in span]
    if not 0 < test_size < len(pairs):
        raise ValueError(f"test_size: {test_size} of {len(pairs)} operand pairs leaves no train or no test row")
    random.Random(seed).shuffle(pairs)
    return pairs[test_size:], pairs[:test_size]


def _row(a: int, b: int, question: str | None) -> dict:
    if question is None:
        return {"prompt": f"{a}+{b}=", "completion": str(a + b)}
    return {"messages": [{"role": "user", "content": question.format(a=a, b=b)},
                         {"role": "assistant", "content": str(a + b)}]}


def write_arithmetic(
    out_dir: str | Path, max_operand: int = 19, test_size: int = 60, seed: int = 0, min_operand: int = 0,
    question: str | None = None,
) -> tuple[Path, Path]:
    """arith_{train,test}.jsonl; `question`: a template with {a} and {b}, which makes the rows `chat`."""
    if question is not None and ("{a}" not in question or "{b}" not in question):
        raise ValueError(f"question: {question!r} names no {{a}} or no {{b}}")
    train, test = _split(max_operand, test_size, seed, min_operand)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("test", test)):
        p = out / f"arith_{name}.jsonl"
        p.write_text("".join(json.dumps(_row(a, b, question)) + "\n" for a, b in rows))
        paths.append(p)
    return paths[0], paths[1]


def write_arithmetic_preferences(
    out_dir: str | Path, max_operand: int = 19, test_size: int = 60, seed: int = 0, min_operand: int = 0
) -> tuple[Path, Path]:
    """arith_pref_{train,test}.jsonl on the same split as `write_arithmetic`: per prompt, the right sum is
    chosen over three wrong answers of the kinds a weak model gives: a near miss (off by 1-3), a number far
    off (off by more than 5), and a malformed answer (the sum with the prompt's tail repeated)."""
    rng = random.Random(seed + 1)
    top = 2 * max_operand
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, split in zip(("train", "test"), _split(max_operand, test_size, seed, min_operand), strict=True):
        rows = []
        for a, b in split:
            right, prompt = a + b, f"{a}+{b}="
            near = rng.choice([right + d for d in (-3, -2, -1, 1, 2, 3) if right + d >= 0])
            far = rng.choice([x for x in range(top + 1) if abs(x - right) > 5])
            malformed = f"{right}{prompt[-2:]}"  # e.g. "19" + "7="
            rows += [{"prompt": prompt, "chosen": str(right), "rejected": str(w)} for w in (near, far, malformed)]
        p = Path(out_dir) / f"arith_pref_{name}.jsonl"
        p.write_text("".join(json.dumps(x) + "\n" for x in rows))
        paths.append(p)
    return paths[0], paths[1]
