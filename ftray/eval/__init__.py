"""`ftray eval` (evaluate.py). The metrics (accuracy/macro-F1, Spearman) live in `ftray.metrics`, below
`methods/`, and are re-exported here."""

from ftray.metrics import confusion_keys, macro_f1_from_confusion, spearman

__all__ = ["confusion_keys", "macro_f1_from_confusion", "spearman"]
