"""MLM masking and the masked-token loss against hand-computed values."""

from __future__ import annotations

import math

import torch

from ftray.methods.losses import mask_tokens, masked_token_cross_entropy


def test_mask_tokens_hand_computed():
    ids = torch.tensor([101, 7, 8, 9, 10, 102])
    maskable = torch.tensor([False, True, True, True, True, False])
    # select < 0.15 picks positions 1, 2, 3 (and 0, 5, which are special); action: 1 -> [MASK], 2 -> random, 3 -> kept
    select = torch.tensor([0.0, 0.1, 0.05, 0.14, 0.5, 0.0])
    action = torch.tensor([0.0, 0.79, 0.85, 0.95, 0.0, 0.0])
    random_ids = torch.tensor([1, 2, 3, 4, 5, 6])
    inputs, labels = mask_tokens(ids, maskable, 103, select, action, random_ids, prob=0.15)
    assert inputs.tolist() == [101, 103, 3, 9, 10, 102]
    assert labels.tolist() == [-100, 7, 8, 9, -100, -100]


def test_masked_token_cross_entropy_hand_computed():
    # vocab 2; position 1 is a target (label 1) with logits [0, ln 3] -> p = 3/4; others ignored; no shift.
    logits = torch.tensor([[[9.0, 0.0], [0.0, math.log(3.0)], [0.0, 9.0]]])
    loss, n = masked_token_cross_entropy(logits, torch.tensor([[-100, 1, -100]]))
    assert n == 1 and abs(loss.item() + math.log(0.75)) < 1e-6
    loss, n = masked_token_cross_entropy(torch.zeros(1, 3, 4, requires_grad=True), torch.full((1, 3), -100))
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad
