"""The metrics `ftray eval` reports; they live in `ftray.metrics` (below `methods/`, which use them too)."""

from ftray.metrics import (
    BALANCE_TOLERANCE,
    accuracy_f1,
    confusion_keys,
    length_baseline,
    length_keys,
    length_summary,
    macro_f1_from_confusion,
    spearman,
)

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
