"""Loss functions against hand-computed values."""

from __future__ import annotations

import math

import torch

from ftray.methods.losses import token_cross_entropy


def test_token_cross_entropy_hand_computed():
    # vocab 2; position 0 predicts label[1]=1 with logits [0, ln 3] -> p=3/4; position 1 is masked.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100]])
    loss, n = token_cross_entropy(logits, labels)
    assert n == 1
    assert abs(loss.item() - (-math.log(0.75))) < 1e-6


def test_token_cross_entropy_mean_over_tokens():
    logits = torch.zeros(1, 3, 4)  # uniform: every token costs ln 4
    loss, n = token_cross_entropy(logits, torch.tensor([[0, 1, 2]]))
    assert n == 2 and abs(loss.item() - math.log(4)) < 1e-6


def test_no_target_gives_zero_with_grad():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    loss, n = token_cross_entropy(logits, torch.full((1, 3), -100))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and logits.grad is not None
