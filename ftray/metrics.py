"""Metrics over held-out rows, computed with scikit-learn and scipy: pure functions of numbers and labels
(no model, no Ray), below `methods/` so that a method's evaluation and `ftray eval` share them.

The training loop averages per-row metric dicts over every rank. A metric that is not a mean of
per-row values is carried in a form that is: a classifier reports each row's confusion-matrix cell
(`cm/<true>/<predicted>` = 1), whose averages are the matrix's shares, from which macro-F1 follows.
Likewise a preference pair reports whether it is length-balanced and, if so, whether the model ranked it
right (`balanced`, `balanced_correct`), whose averages give the accuracy on the balanced subset.
"""

from __future__ import annotations

__all__ = [
    "BALANCE_TOLERANCE",
    "accuracy_f1",
    "confusion_keys",
    "length_baseline",
    "length_keys",
    "length_summary",
    "macro_f1_from_confusion",
    "spearman",
]

# A pair is length-balanced when its replies' lengths (characters) differ by at most this share of the
# longer one: there "the longer reply is the chosen one" is near a coin toss, so a model must read.
BALANCE_TOLERANCE = 0.2


def confusion_keys(true: int, pred: int, n_labels: int) -> dict[str, float]:
    """One row's confusion-matrix cell as a dict of every cell (every rank must report the same keys)."""
    return {f"cm/{t}/{p}": float(t == true and p == pred) for t in range(n_labels) for p in range(n_labels)}


def macro_f1_from_confusion(scores: dict[str, float]) -> float:
    """Macro-F1 from averaged `cm/<t>/<p>` shares (F1 is scale-free, so shares work as counts)."""
    from sklearn.metrics import f1_score

    cells = [(int(k.split("/")[1]), int(k.split("/")[2]), v) for k, v in scores.items() if k.startswith("cm/")]
    cells = [c for c in cells if c[2] > 0]
    if not cells:
        return float("nan")
    t, p, w = zip(*cells, strict=True)
    return float(f1_score(t, p, sample_weight=w, average="macro", zero_division=0))


def accuracy_f1(true: list, pred: list) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(true, pred)), "macro_f1": float(f1_score(true, pred, average="macro"))}


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def _length_vote(chosen: str, rejected: str) -> float:
    """The length heuristic on one pair (the longer reply is the chosen one): 1 right, 0 wrong, 0.5 on equal
    lengths (a coin toss, as a model's tied scores count half)."""
    return 1.0 if len(chosen) > len(rejected) else 0.0 if len(chosen) < len(rejected) else 0.5


def _balanced(chosen: str, rejected: str) -> bool:
    return abs(len(chosen) - len(rejected)) <= BALANCE_TOLERANCE * max(len(chosen), len(rejected))


def length_baseline(rows: list[dict]) -> tuple[float, list[int]]:
    """Preference rows (prompt/chosen/rejected) -> (the length heuristic's accuracy, the indices of the
    length-balanced pairs). Lengths are the replies' characters; a tie counts 0.5; no rows: (nan, [])."""
    if not rows:
        return float("nan"), []
    acc = sum(_length_vote(r["chosen"], r["rejected"]) for r in rows) / len(rows)
    return acc, [i for i, r in enumerate(rows) if _balanced(r["chosen"], r["rejected"])]


def length_keys(row: dict, correct: float) -> dict[str, float]:
    """Per-row keys beside a model's pairwise `correct` (1, 0 or 0.5 on a tie): the length heuristic's score
    on the row, whether the row is length-balanced, and `correct` if it is (else 0). `length_summary` turns
    their averages over the held-out rows into the reported figures."""
    balanced = float(_balanced(row["chosen"], row["rejected"]))
    return {"length_correct": _length_vote(row["chosen"], row["rejected"]), "balanced": balanced,
            "balanced_correct": balanced * correct}


def length_summary(scores: dict[str, float], accuracy_key: str) -> dict[str, float]:
    """Averaged `length_keys` -> `length_heuristic_accuracy`; `balanced_accuracy` (the model's accuracy on
    the balanced pairs, nan when there are none); `balanced_pairs` (their share of all pairs, 0..1: the
    loop hands over means, not counts); `beats_length_heuristic` (1.0 when `accuracy_key` is above the
    heuristic, else 0.0). Other keys pass through."""
    out = {k: v for k, v in scores.items() if k not in ("length_correct", "balanced", "balanced_correct")}
    if "length_correct" not in scores:  # no scored rows
        return out
    share = scores["balanced"]
    out["length_heuristic_accuracy"] = scores["length_correct"]
    out["balanced_accuracy"] = scores["balanced_correct"] / share if share > 0 else float("nan")
    out["balanced_pairs"] = share
    out["beats_length_heuristic"] = float(scores[accuracy_key] > scores["length_correct"])
    return out
