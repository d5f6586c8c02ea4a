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


def _full_logps(logits, tokens):
    return torch.gather(logits.float().log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_equals_the_full_one():
    """Per-token log-probs without the (B, T, V) log-softmax: the same values and gradients as the full
    log_softmax + gather, at ignored (-100) positions too, through TRL's function and the fallback."""
    from ftray.methods.losses import _logsumexp_gather, token_logps

    g = torch.Generator().manual_seed(0)
    # unit-scale logits: log-probs near -log(50) = -3.9, where fp32 resolves 4.8e-7 (1e-6 is a fair bound)
    logits = torch.randn(3, 9, 50, generator=g).requires_grad_()
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    labels[2, ::2] = -100
    tokens = labels[:, 1:].clamp(min=0)
    want = _full_logps(logits[:, :-1], tokens)
    got = token_logps(logits[:, :-1], tokens)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-6
    assert (_logsumexp_gather(logits[:, :-1].detach(), tokens) - want.detach()).abs().max() < 1e-6

    mask = labels[:, 1:] != -100
    lp, n = sequence_logps(logits, labels)
    assert n.tolist() == mask.sum(-1).tolist()
    assert torch.allclose(lp, (want * mask).sum(-1), atol=1e-6, rtol=1e-6)
    (g_sel,) = torch.autograd.grad(lp.sum(), logits)
    (g_full,) = torch.autograd.grad((want * mask).sum(), logits)
    assert (g_sel - g_full).abs().max() < 1e-6 and g_sel[0, :3].abs().max() == 0  # nothing flows from the prompt

    # bf16 logits: fp32 arithmetic on the bf16 values, as before (not a bf16 log-softmax)
    half = logits.detach().to(torch.bfloat16)
    got16 = token_logps(half[:, :-1], tokens)
    assert got16.dtype == torch.float32 and (got16 - _full_logps(half[:, :-1], tokens)).abs().max() < 1e-5


def test_cross_entropies_read_the_same_log_probs():
    """sft/causal_lm's and masked_lm/seq2seq's cross-entropies, now from `token_logps`, equal torch's."""
    import torch.nn.functional as F

    from ftray.methods.losses import masked_token_cross_entropy, token_cross_entropy

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 40, generator=g)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[0, :3] = -100
    loss, n = token_cross_entropy(logits, labels)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert n == int((labels[:, 1:] != -100).sum()) and abs(loss.item() - want.item()) < 1e-6
    loss, n = masked_token_cross_entropy(logits, labels)
    want = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    assert n == 9 and abs(loss.item() - want.item()) < 1e-6
    none = torch.full_like(labels, -100)
    assert token_cross_entropy(logits, none)[1] == 0 and masked_token_cross_entropy(logits, none)[0].item() == 0.0
