"""Loss functions as pure tensor functions: no model, no Ray. Unit-tested against hand-computed values."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "GRPO_LOSS_TYPES",
    "aggregate_token_loss",
    "bradley_terry_loss",
    "clipped_surrogate",
    "clipped_value_loss",
    "gae",
    "head_positions",
    "kept_sequence_logps",
    "whiten",
    "group_advantages",
    "k3_kl",
    "masked_mean",
    "token_logps",
    "cosine_similarity_loss",
    "dec_loss",
    "dpo_loss",
    "info_nce",
    "mask_tokens",
    "masked_token_cross_entropy",
    "mean_pool",
    "sentence_order_label",
    "sequence_logps",
    "token_cross_entropy",
]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t + 1]; mean over unmasked tokens.

    Returns (mean loss, number of unmasked target tokens). A batch with no target token gives a
    zero loss that still depends on the logits, so backward and DeepSpeed's hooks run on every rank.
    The log-probs come from `token_logps` (no full-vocabulary log-softmax), like every method's.
    """
    lp, n = sequence_logps(logits, labels, ignore_index)
    n_all = int(n.sum())
    if n_all == 0:
        return logits.sum().float() * 0.0, 0
    return -lp.sum() / n_all, n_all


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors a sequence really has (mask 1), as sentence-transformers' mean pooling."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def dec_loss(z: torch.Tensor, centres: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """DEC's clustering loss (Xie et al. 2016; the clustering half of SCCL, Zhang et al. 2021) over cosine
    similarity: Q = softmax(z_i . mu_j / temperature) for unit vectors z (B, d) and centres mu (k, d); the target
    P_ij = Q_ij^2 / f_j renormalised per row, f_j = sum_i Q_ij (sharper than Q, and no centre takes every text);
    KL(P || Q) per text with P held fixed, mean over the batch."""
    q = (z @ centres.T / temperature).softmax(-1)
    with torch.no_grad():
        p = q.pow(2) / q.sum(0)
        p = p / p.sum(-1, keepdim=True)
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1).mean()


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
    offset: int = 0,
) -> torch.Tensor:
    """In-batch-negatives InfoNCE (sentence-transformers' MultipleNegativesRankingLoss).

    anchors: (B, d); positives: (P, d) with P >= offset + B; negatives: (M, d) extra candidates (hard
    negatives) or None. Anchor i must pick positive offset + i among all P positives (and the M negatives)
    by cosine / temperature; mean cross-entropy over the B anchors. `offset`: where this rank's pairs sit
    among positives gathered from every rank (0 on one rank, P = B).
    """
    a = F.normalize(anchors.float(), dim=-1)
    cands = positives if negatives is None or negatives.numel() == 0 else torch.cat([positives, negatives])
    logits = a @ F.normalize(cands.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(offset, offset + a.size(0), device=a.device))


def cosine_similarity_loss(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between cos(a_i, b_i) and target_i (sentence-transformers' CosineSimilarityLoss)."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return F.mse_loss(cos, target.float())


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    select: torch.Tensor,
    action: torch.Tensor,
    random_ids: torch.Tensor,
    prob: float = 0.15,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, with the random draws passed in (so it is pure and testable by hand).

    A maskable token with select < prob is a target: action < 0.8 -> `mask_id`, 0.8 <= action < 0.9 ->
    `random_ids`, else kept. Returns (inputs, labels); labels hold the original id at targets, else
    `ignore_index`.
    """
    target = maskable.bool() & (select < prob)
    inputs = ids.clone()
    inputs[target & (action < 0.8)] = mask_id
    swap = target & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_ids[swap]
    labels = torch.where(target, ids, torch.full_like(ids, ignore_index))
    return inputs, labels


def masked_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Cross-entropy at the masked positions (no shift: position t predicts its own token); mean over
    targets. Like `token_cross_entropy`, a batch without targets gives a zero loss that keeps the graph."""
    mask = labels != ignore_index
    n = int(mask.sum())
    if n == 0:
        return logits.sum().float() * 0.0, 0
    return -torch.where(mask, token_logps(logits, labels.clamp(min=0)), 0.0).sum() / n, n


def sentence_order_label(order: list[int] | tuple[int, ...]) -> int:
    """The class of a shuffled order: its index among all orders of n items in lexicographic order
    (the Lehmer code read as a factorial-base number). (0, 1, 2) -> 0, (0, 2, 1) -> 1, (2, 1, 0) -> 5."""
    items, label = sorted(order), 0
    for i, x in enumerate(order):
        pos = items.index(x)
        label += pos * math.factorial(len(order) - 1 - i)
        items.pop(pos)
    return label


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r_chosen - r_rejected), mean over pairs (each pair's when not
    `reduce`; Bradley-Terry, as in InstructGPT and TRL's RewardTrainer)."""
    losses = -F.logsigmoid(chosen.float() - rejected.float())
    return losses.mean() if reduce else losses


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(token) over the labelled (response) tokens: logits[:, t] predicts
    labels[:, t + 1]. Returns (sum of log-probs (B,), labelled token count (B,))."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != ignore_index
    logp = token_logps(logits[:, :-1], shift_labels.clamp(min=0))
    return torch.where(mask, logp, 0.0).sum(-1), mask.sum(-1)


def head_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) bool: the positions whose logits predict a labelled token (logits[:, t] predicts labels[:, t + 1]);
    the last position predicts nothing. transformers' `logits_to_keep` takes it to run the LM head there only."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != ignore_index
    return keep


KEPT_CHUNK = 512  # positions per log-softmax: a (512, V) fp32 temporary, 100 MB at SmolLM2's V


def kept_sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` from the logits of `head_positions(labels)` only: `logits` is (N, V), one row per kept
    position in row-major order, as transformers returns them for a boolean `logits_to_keep`. Returns (sum of
    log-probs (B,), labelled token count (B,))."""
    labelled = labels[:, 1:] != ignore_index  # the kept positions, less the last column (never kept)
    targets = labels[:, 1:][labelled]
    if logits.shape[0] == 0:  # no labelled token: a zero that still depends on the logits (backward reaches every weight)
        lp = logits.sum(-1).float()
    else:
        lp = torch.cat([token_logps(c.unsqueeze(0), t.unsqueeze(0))[0]
                        for c, t in zip(logits.split(KEPT_CHUNK), targets.split(KEPT_CHUNK), strict=True)])
    rows = labelled.nonzero(as_tuple=True)[0]
    sums = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, labelled.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    reduce: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its variants on summed response log-probs. d = (pi_c - ref_c) - (pi_r - ref_r):
        sigmoid  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d)        (DPO; e > 0: cDPO)
        hinge    (1 - e) relu(1 - beta d) + e relu(1 + beta d)                  (SLiC; e flips the label)
        ipo      (d' - 1 / (2 beta))^2, d' from per-token mean log-ratios       (IPO, TRL's normalisation)
    Without smoothing (e = 0) each equals TRL 1.16's DPOTrainer loss of that name within 1e-6 (0.0 measured,
    tests/test_losses_dpo_trl.py; TRL has them only inside the trainer). TRL 1.16's sigmoid and hinge ignore
    `label_smoothing`; ftray keeps cDPO (beta 0.5, e 0.1 on the test batch: 1.1461 here, TRL's sigmoid 1.2303),
    the formula of TRL's `aot_unpaired` taken pair by pair; the smoothed hinge has no TRL counterpart.
    Returns (mean loss, or each pair's loss when not `reduce`; chosen rewards beta (pi_c - ref_c), rejected
    rewards beta (pi_r - ref_r))."""
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    d = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = (1 - e) * torch.relu(1 - beta * d) + e * torch.relu(1 + beta * d)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the response token counts")
        d = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses.mean() if reduce else losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each completion's reward minus the mean of its prompt's group, divided by the
    group's standard deviation (unbiased, as TRL and the DeepSeekMath paper) when `scale`. Rewards are
    laid out group by group: (n_prompts * group_size,). A group whose rewards are all equal gets 0."""
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - pi) - (ref - pi) - 1 (Schulman's unbiased,
    non-negative estimator; GRPO's penalty), from the sampled tokens' log-probabilities."""
    d = ref_logp.float() - logp.float()
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss: -min(r A, clip(r, 1 - eps, 1 + eps) A) with
    r = exp(logp - old_logp); `advantages` broadcast over tokens. Returns (loss per token, clipped mask)."""
    ratio = torch.exp(logp.float() - old_logp.float())
    a = advantages.float()
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int, n_tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """GRPO's per-token losses (B, T) of the completions (`mask` 1) to one number, as TRL's GRPOTrainer:
        grpo     mean over each completion's tokens, then over completions (DeepSeekMath)
        dapo     sum over all tokens / `n_tokens` (default: this batch's token count) (DAPO)
        dr_grpo  sum over all tokens / (B x max_completion_length), a constant (Dr. GRPO)
    `grpo` weighs a short completion's tokens more than a long one's; the other two weigh every token alike."""
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    if loss_type == "dapo":
        return total / (mask.sum() if n_tokens is None else n_tokens).clamp(min=1)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * max_completion_length)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}")


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t] | ...) from logits[:, t] (already shifted by the caller): (B, T), in fp32.

    Every per-token log-prob of the methods goes through here. It never builds the (B, T, V) fp32
    log-softmax: log p = logit[token] - logsumexp(logits), one sequence at a time (TRL's
    `selective_log_softmax`, or its fused kernel on a GPU). With SmolLM2's 49,152-token vocabulary a
    full fp32 log-softmax of 8 x 512 positions is 0.8 GB, twice over with its gradient."""
    select = _selective_log_softmax()
    if logits.dtype in (torch.float32, torch.float64):
        return select(logits, tokens)
    # bf16/fp16 logits: TRL would take their log-softmax in bf16; cast one sequence at a time instead.
    return torch.stack([select(lg.float(), tk) for lg, tk in zip(logits, tokens, strict=True)])


@functools.cache
def _selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax  # imported on first use: trl takes ~1 s to import

        return selective_log_softmax
    except ImportError:
        return _logsumexp_gather


def _logsumexp_gather(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The same idea as TRL's, for when trl is not importable: gather the token's logit, subtract the
    row's logsumexp, one sequence at a time (the peak is one (T, V) temporary, not (B, T, V))."""
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over completion tokens (B, T); positions where `mask` is 0 (after
    the completion's end) neither earn nor pass on anything. Returns (advantages, returns = A + V)."""
    r, v, m = rewards.float(), values.float(), mask.float()
    adv = torch.zeros_like(r)
    last = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in reversed(range(r.shape[1])):
        nxt = v[:, t + 1] * m[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(last)
        delta = r[:, t] + gamma * nxt - v[:, t]
        last = (delta + gamma * lam * last * (m[:, t + 1] if t + 1 < r.shape[1] else 0.0)) * m[:, t]
        adv[:, t] = last
    return adv, adv + v


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's value loss per token: 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
    v, r = values.float(), returns.float()
    vc = old_values.float() + torch.clamp(v - old_values.float(), -clip, clip)
    return 0.5 * torch.max((v - r) ** 2, (vc - r) ** 2)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (advantage normalisation)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps)
