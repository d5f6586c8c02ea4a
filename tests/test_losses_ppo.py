"""PPO's pieces against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from ftray.methods.losses import clipped_value_loss, gae, whiten


def test_gae_by_hand():
    # one sequence of 3 tokens, then padding; gamma 0.5, lambda 0.5
    r = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5)
    d2 = 1.0 - 0.4                     # last token: no next value
    d1 = 0.0 + 0.5 * 0.4 - 0.2
    d0 = 0.0 + 0.5 * 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.25 * a2
    a0 = d0 + 0.25 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4])
    # gamma = lambda = 1: the advantage is the return-to-go minus the value
    adv, _ = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([6 - 1, 5 - 1, 3 - 1])


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    # v=1 from old 0 with clip 0.2: clipped v = 0.2; max((1-2)^2, (0.2-2)^2) = 3.24
    # v=0 = old: both (0-1)^2 = 1
    assert clipped_value_loss(v, old, ret, 0.2).tolist() == pytest.approx([0.5 * 3.24, 0.5])


def test_whiten_over_the_mask():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 0]])
    w = whiten(x, m)
    assert w[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
