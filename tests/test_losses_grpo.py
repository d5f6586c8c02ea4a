"""GRPO's pieces against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ftray.methods._rollout import completion_mask
from ftray.methods.losses import aggregate_token_loss, clipped_surrogate, group_advantages, k3_kl, masked_mean
from ftray.rlhf.rewards import build_reward, last_number, verifiable_rewards


def test_group_advantages_by_hand():
    # two groups of 3: [1, 0, 0] -> mean 1/3, unbiased std sqrt(1/3); [2, 2, 2] -> all zero
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0]), 3, eps=0.0 + 1e-12)
    s = math.sqrt(1 / 3)
    assert adv[:3].tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], rel=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]
    unscaled = group_advantages(torch.tensor([1.0, 0.0, 3.0, 0.0]), 2, scale=False)
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, 1.5, -1.5])


def test_k3_kl_by_hand():
    # d = ref - pi = log(0.5) - log(0.25) = log 2: k3 = 2 - log 2 - 1
    kl = k3_kl(torch.tensor([math.log(0.25), math.log(0.3)]), torch.tensor([math.log(0.5), math.log(0.3)]))
    assert kl.tolist() == pytest.approx([1 - math.log(2), 0.0], abs=1e-6)
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_clipped_surrogate_by_hand():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios, old_logp = 0
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # r=1.5, A=1: min(1.5, 1.2) = 1.2 (clipped); r=0.5, A=1: min(0.5, 0.8) = 0.5
    # r=1.1, A=-1: min(-1.1, -1.1) = -1.1; r=0.7, A=-1: min(-0.7, -0.8) = -0.8 (clipped)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.1, 0.8], rel=1e-5)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]
    # one update per rollout: ratio 1, the gradient is the policy gradient -A grad(logp)
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    lo, _ = clipped_surrogate(lp, lp.detach(), torch.tensor([2.0, -1.0]), 0.2)
    lo.sum().backward()
    assert lp.grad.tolist() == pytest.approx([-2.0, 1.0])


def test_masked_mean_and_completion_mask():
    m = completion_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), eos_id=2)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    x = torch.tensor([[1.0, 3.0, 100.0, 100.0], [1.0, 1.0, 1.0, 5.0]])
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([2.0, 2.0])
    assert float(masked_mean(x, m)) == pytest.approx((1 + 3 + 1 + 1 + 1 + 5) / 6)


def test_verifiable_rewards():
    w = {"exact_match": 1.0, "numeric_match": 1.0, "format": 1.0}
    assert verifiable_rewards(" 27 ", "27", w, r"\d+") == {"exact_match": 1.0, "numeric_match": 1.0, "format": 1.0}
    assert verifiable_rewards("so it is 1,200.", "1200", w, r"\d+") == {"exact_match": 0.0, "numeric_match": 1.0, "format": 0.0}
    assert verifiable_rewards("no idea", "5", w, r"\d+")["numeric_match"] == 0.0
    assert last_number("$20 - $15 = $5.5 left") == 5.5 and last_number("none") is None
    close = {"numeric_closeness": 1.0}
    # 1 - |got - want| / max(|want|, 1), floored at 0; the last number counts; none: 0
    assert verifiable_rewards("85", "86", close)["numeric_closeness"] == pytest.approx(1 - 1 / 86)
    assert verifiable_rewards("47 + 38 = 8", "85", close)["numeric_closeness"] == pytest.approx(8 / 85)
    assert verifiable_rewards("200", "85", close)["numeric_closeness"] == 0.0
    assert verifiable_rewards(" 85", "85", close)["numeric_closeness"] == 1.0
    assert verifiable_rewards("-1", "0", close)["numeric_closeness"] == 0.0  # |want| < 1: error over 1
    assert verifiable_rewards("0.5", "0", close)["numeric_closeness"] == pytest.approx(0.5)
    assert verifiable_rewards("no idea", "85", close)["numeric_closeness"] == 0.0


def test_closeness_gives_a_group_of_wrong_numbers_an_advantage():
    """The shipped SmolLM2 recipe's reward on one group of wrong bare numbers: with 0/1 rewards alone each earns the
    format term and the group has no advantage; with `numeric_closeness` the nearer number earns more."""
    from ftray.config import GRPOMethod

    wrong = ["84", "8", "60"]
    plain = build_reward(GRPOMethod(rewards={"exact_match": 1.0, "numeric_match": 0.5, "format": 0.1}, format_regex=r"\d+"))
    close = build_reward(GRPOMethod(rewards={"exact_match": 1.0, "numeric_match": 0.5, "format": 0.1,
                                             "numeric_closeness": 0.5}, format_regex=r"\d+"))
    totals, _ = plain(wrong, ["85"] * 3)
    assert totals == pytest.approx([0.1] * 3)
    assert group_advantages(torch.tensor(totals), 3, scale=False).abs().max() < 1e-6
    totals, means = close([*wrong, "85"], ["85"] * 4)
    near = [1 - 1 / 85, 8 / 85, 60 / 85, 1.0]
    assert totals == pytest.approx([0.1 + 0.5 * c for c in near[:3]] + [1.0 + 0.5 + 0.1 + 0.5])
    assert means["reward/numeric_closeness"] == pytest.approx(sum(near) / 4)
    adv = group_advantages(torch.tensor(totals[:3]), 3, scale=False)
    assert adv.argmax() == 0 and adv.argmin() == 1  # 84 pulled up, 8 pushed down


# Two completions of 3 and 2 tokens (the 100s lie after their ends): token sums 6 and 10.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 6.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize(
    ("loss_type", "kw", "value", "grads"),
    [
        # mean per completion (2 and 5), then over completions; a token of the short one weighs 1/2 x 1/2
        ("grpo", {}, 3.5, (1 / 6, 1 / 4)),
        # every token alike: 16 / 5 tokens; or over a token count given from all ranks (8)
        ("dapo", {}, 16 / 5, (1 / 5, 1 / 5)),
        ("dapo", {"n_tokens": torch.tensor(8.0)}, 2.0, (1 / 8, 1 / 8)),
        # a constant: 16 / (2 completions x max_completion_length 8)
        ("dr_grpo", {}, 1.0, (1 / 16, 1 / 16)),
    ],
)
def test_grpo_loss_aggregations_by_hand(loss_type, kw, value, grads):
    x = PER_TOKEN.clone().requires_grad_()
    loss = aggregate_token_loss(x, MASK, loss_type, max_completion_length=8, **kw)
    assert loss.item() == pytest.approx(value)
    loss.backward()
    want = torch.tensor([[grads[0]] * 3 + [0.0], [grads[1]] * 2 + [0.0, 0.0]])
    assert torch.allclose(x.grad, want)


def test_grpo_loss_type_field():
    from ftray.config import SpecError, spec_from_dict

    base = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "train": {"max_steps": 1}, "output": {"dir": "o"}}
    # the default is the aggregation ftray had before the field existed
    assert spec_from_dict({**base, "method": {"kind": "grpo"}}).method.loss_type == "grpo"
    assert spec_from_dict({**base, "method": {"kind": "grpo", "loss_type": "dr_grpo"}}).method.loss_type == "dr_grpo"
    for kind, bad, msg in [
        ("grpo", "sigmoid", r"`method.loss_type`: Input should be 'grpo', 'dapo' or 'dr_grpo' \(got 'sigmoid'\)"),
        ("dpo", "dapo", r"`method.loss_type`: Input should be 'sigmoid', 'ipo' or 'hinge' \(got 'dapo'\)"),
        ("ppo", "dapo", r"`method.loss_type` applies to dpo and grpo; ppo averages"),
    ]:
        with pytest.raises(SpecError, match=msg) as err:
            spec_from_dict({**base, "method": {"kind": kind, "loss_type": bad}}, "job.yaml")
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown GRPO loss_type"):
        aggregate_token_loss(PER_TOKEN, MASK, "bnpo", 8)
