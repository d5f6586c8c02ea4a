"""The encoder methods' loss functions against hand-computed values."""

from __future__ import annotations

import math

import torch

from ftray.methods.losses import cosine_similarity_loss, dec_loss, info_nce, mean_pool


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_dec_loss_hand_computed():
    # Two texts on two centres at temperature 1: Q rows [a, b] and [b, a] with a = e / (e + 1), b = 1 - a; the
    # column sums are 1, so P_i = Q_i^2 renormalised: [a^2, b^2] / (a^2 + b^2), and the loss is KL(P_i || Q_i).
    a = math.e / (math.e + 1)
    b = 1 - a
    p = [a * a / (a * a + b * b), b * b / (a * a + b * b)]
    expected = p[0] * math.log(p[0] / a) + p[1] * math.log(p[1] / b)
    eye = torch.eye(2)
    assert abs(dec_loss(eye, eye, temperature=1.0).item() - expected) < 1e-6
    # Both texts lean to centre 0: f = [2a, 2b] undoes the squaring, P = Q and nothing pulls them further
    # (DEC's balance: no centre takes every text).
    both = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert abs(dec_loss(both, eye, temperature=1.0).item()) < 1e-7
    # The temperature divides the cosines: at 0.5 the logits are [2, 0].
    a2 = math.e**2 / (math.e**2 + 1)
    p2 = a2 * a2 / (a2 * a2 + (1 - a2) ** 2)
    expected2 = p2 * math.log(p2 / a2) + (1 - p2) * math.log((1 - p2) / (1 - a2))
    assert abs(dec_loss(eye, eye, temperature=0.5).item() - expected2) < 1e-6


def test_info_nce_in_batch_negatives_hand_computed():
    # cos(a_i, p_j) = [[1, 0], [0, 1]] at temperature 1: each anchor's loss is -log(e / (e + 1)).
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.e / (math.e + 1))
    assert abs(info_nce(a, p, temperature=1.0).item() - expected) < 1e-6
    # Length does not matter (cosine), the temperature divides: at 0.5 the logits are [[2, 0], [0, 2]].
    assert abs(info_nce(3 * a, p, temperature=0.5).item() - (-math.log(math.e**2 / (math.e**2 + 1)))) < 1e-6


def test_info_nce_hard_negatives_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.0, 1.0]])  # a hard negative that looks like anchor 2's positive
    # anchor 1: logits [1, 0, 0] -> -log(e / (e + 2)); anchor 2: logits [0, 1, 1] -> -log(e / (1 + 2e)).
    expected = (-math.log(math.e / (math.e + 2)) - math.log(math.e / (1 + 2 * math.e))) / 2
    assert abs(info_nce(a, p, n, temperature=1.0).item() - expected) < 1e-6


def test_info_nce_offset_points_at_this_ranks_positives():
    # Positives gathered from 2 ranks (2 each); this rank's anchors are pairs 2 and 3.
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # anchor 1: logits [1, 0, 1, 0] -> -log(e / (2e + 2)); anchor 2 alike.
    expected = -math.log(math.e / (2 * math.e + 2))
    assert abs(info_nce(a, p, temperature=1.0, offset=2).item() - expected) < 1e-6
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # now each anchor's own positive (2, 3) is the wrong one
    assert abs(info_nce(a, p, temperature=1.0, offset=2).item() + math.log(1 / (2 * math.e + 2))) < 1e-6


def test_info_nce_perfect_separation_goes_to_zero():
    a = torch.eye(3)
    assert info_nce(a, a, temperature=0.01).item() < 1e-6


def test_cosine_similarity_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # cos = [1, 0], targets [1, 0.5]: ((1 - 1)^2 + (0 - 0.5)^2) / 2 = 0.125
    assert abs(cosine_similarity_loss(a, b, torch.tensor([1.0, 0.5])).item() - 0.125) < 1e-7


def test_losses_have_gradients():
    a = torch.randn(4, 8, requires_grad=True)
    p = torch.randn(4, 8, requires_grad=True)
    (info_nce(a, p) + cosine_similarity_loss(a, p, torch.rand(4))).backward()
    assert a.grad is not None and p.grad is not None and a.grad.abs().sum() > 0
