"""Loss functions as pure tensor functions: no model, no Ray. Unit-tested against hand-computed values."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_cross_entropy"]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; mean over unmasked tokens.

    Returns (mean loss, number of unmasked target tokens). A batch with no target token gives a
    zero loss that still depends on the logits, so backward and DeepSpeed's hooks run on every rank.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != ignore_index).sum())
    if n == 0:
        return shift_logits.sum() * 0.0, 0
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return loss / n, n
