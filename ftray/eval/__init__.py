"""Metrics: accuracy/macro-F1 (scikit-learn), Spearman (scipy), NMI/ARI; `ftray eval` (evaluate.py)."""

from ftray.eval.metrics import confusion_keys, macro_f1_from_confusion, spearman

__all__ = ["confusion_keys", "macro_f1_from_confusion", "spearman"]
