"""Preference losses against values computed by hand: Bradley-Terry, DPO (sigmoid, hinge, ipo; label
smoothing), and the response log-probabilities they read."""

from __future__ import annotations

import math

import pytest
import torch

from ftray.methods.losses import bradley_terry_loss, dpo_loss, sequence_logps


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_bradley_terry():
    # -log sigmoid(2 - 1) = log(1 + e^-1) = 0.3132617; -log sigmoid(0) = log 2 = 0.6931472
    assert bradley_terry_loss(t(2.0, 0.0), t(1.0, 0.0)).item() == pytest.approx((0.3132617 + 0.6931472) / 2, abs=1e-6)
    # a pair the wrong way round costs more than the same pair the right way round: log(1 + e^1) = 1.3132617
    assert bradley_terry_loss(t(1.0), t(2.0)).item() == pytest.approx(1.3132617, abs=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up():
    c, r = t(0.3).requires_grad_(), t(0.1).requires_grad_()
    bradley_terry_loss(c, r).backward()
    # d/dc = -(1 - sigmoid(0.2)) = -0.4501660; d/dr = +0.4501660
    assert c.grad.item() == pytest.approx(-0.4501660, abs=1e-6) and r.grad.item() == pytest.approx(0.4501660, abs=1e-6)


# policy chosen/rejected -1/-3, reference -2/-2: log-ratios +1/-1, d = 2
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def test_dpo_sigmoid():
    loss, rc, rr = dpo_loss(*PAIR, beta=0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)  # -log sigmoid(0.5 * 2)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_dpo_sigmoid_label_smoothing():
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617
    loss, _, _ = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.4132617, abs=1e-6)


def test_dpo_at_the_reference_is_log2():
    same = (t(-4.0, -1.0), t(-2.0, -7.0), t(-4.0, -1.0), t(-2.0, -7.0))
    assert dpo_loss(*same, beta=0.1)[0].item() == pytest.approx(math.log(2), abs=1e-7)
    assert dpo_loss(*same, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(1.0)


def test_dpo_hinge():
    assert dpo_loss(*PAIR, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.0)  # relu(1 - 1)
    assert dpo_loss(*PAIR, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)  # relu(1 - 0.5)
    # smoothing 0.1: 0.9 * relu(1 - 0.5) + 0.1 * relu(1 + 0.5) = 0.45 + 0.15
    assert dpo_loss(*PAIR, beta=0.25, loss_type="hinge", label_smoothing=0.1)[0].item() == pytest.approx(0.6)


def test_dpo_ipo_uses_per_token_log_ratios():
    # log-ratios +1 over 2 tokens, -1 over 4 tokens: d' = 0.5 + 0.25 = 0.75; (0.75 - 1 / (2 * 0.5))^2 = 0.0625
    loss, _, _ = dpo_loss(*PAIR, beta=0.5, loss_type="ipo", chosen_tokens=t(2), rejected_tokens=t(4))
    assert loss.item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(*PAIR, beta=0.5, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss_type"):
        dpo_loss(*PAIR, beta=0.5, loss_type="kto")


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc, pr = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
    dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.5)[0].backward()
    # d loss / d pc = -beta (1 - sigmoid(beta d)) = -0.5 * 0.2689414
    assert pc.grad.item() == pytest.approx(-0.1344707, abs=1e-6) and pr.grad.item() == pytest.approx(0.1344707, abs=1e-6)


def test_sequence_logps_counts_response_tokens_only():
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, 1] = math.log(3.0)  # p(token 1 | position 0) = 3 / 6
    labels = torch.tensor([[-100, 1, 2, -100]])  # position 0 predicts 1 (p 0.5), position 1 predicts 2 (p 0.25)
    lp, n = sequence_logps(logits, labels)
    assert n.tolist() == [2] and lp.item() == pytest.approx(math.log(0.125), abs=1e-6)
