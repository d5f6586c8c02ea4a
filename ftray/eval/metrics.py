"""Metrics over held-out rows, computed with scikit-learn and scipy.

The training loop averages per-row metric dicts over every rank. A metric that is not a mean of
per-row values is carried in a form that is: a classifier reports each row's confusion-matrix cell
(`cm/<true>/<predicted>` = 1), whose averages are the matrix's shares, from which macro-F1 follows.
"""

from __future__ import annotations

__all__ = ["accuracy_f1", "confusion_keys", "macro_f1_from_confusion", "spearman"]


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
