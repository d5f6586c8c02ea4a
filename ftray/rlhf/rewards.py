"""Rewards of sampled completions: verifiable functions of (completion, reference) and, optionally, the
score of a served reward model for each completion in its conversation. `build_reward(method_spec, scorer)` combines them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RewardFn", "build_reward", "last_number", "verifiable_rewards"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in `text` (thousands commas dropped), or None: GSM8K's answers are checked this way."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def verifiable_rewards(
    completion: str, reference: str, weights: dict[str, float], format_regex: str | None = None
) -> dict[str, float]:
    """Each named verifiable reward (unweighted, in [0, 1]) of one completion. `numeric_closeness` is partial credit
    for a near number: 1 - |got - want| / max(|want|, 1) for the completion's last number, floored at 0 (0 without
    one). Unlike the 0/1 rewards it tells apart wrong answers of one group (85 is nearer to 86 than 8 is), so a group
    with no right answer still has an advantage to learn from."""
    out: dict[str, float] = {}
    if "exact_match" in weights:
        out["exact_match"] = float(completion.strip() == reference.strip())
    if "numeric_match" in weights or "numeric_closeness" in weights:
        got, want = last_number(completion), last_number(reference)
        err = None if got is None or want is None else abs(got - want)
        if "numeric_match" in weights:
            out["numeric_match"] = float(err is not None and err < 1e-6)
        if "numeric_closeness" in weights:
            out["numeric_closeness"] = 0.0 if err is None else max(0.0, 1.0 - err / max(abs(want), 1.0))
    if "format" in weights:
        out["format"] = float(bool(format_regex and re.fullmatch(format_regex, completion.strip(), re.DOTALL)))
    return out


@dataclass
class RewardFn:
    """rewards(completions, references, served_items) -> (total reward per completion, per-source means and the
    seconds spent in the served model). `served_items`: the served model's input of each completion (a rendered
    string or {"prompt", "response"}; see `ftray.serve.engine.ScorerEngine.text`), when it is set."""

    weights: dict[str, float]
    format_regex: str | None = None
    served: Callable[[list], list[float]] | None = None
    served_weight: float = 1.0
    last_served: list[float] = field(default_factory=list)  # the served model's scores of the last call

    def __call__(self, completions: list[str], references: list[str], served_items: list | None = None) -> tuple[list[float], dict[str, float]]:
        parts = [verifiable_rewards(c, r, self.weights, self.format_regex) for c, r in zip(completions, references, strict=True)]
        totals = [sum(self.weights[k] * v for k, v in p.items()) for p in parts]
        means = {f"reward/{k}": sum(p[k] for p in parts) / len(parts) for k in self.weights} if parts else {}
        served_s = 0.0
        if self.served is not None:
            t0 = time.time()
            if served_items is None or len(served_items) != len(completions):
                raise ValueError("a served reward model needs one input per completion")
            scores = self.served(served_items)
            self.last_served = scores
            served_s = time.time() - t0
            totals = [t + self.served_weight * s for t, s in zip(totals, scores, strict=True)]
            means["reward/model"] = sum(scores) / len(scores) if scores else 0.0
        means["score_s"] = served_s
        return totals, means


def build_reward(m, served: Callable[[list], list[float]] | None = None) -> RewardFn:
    """The reward of a `grpo` / `ppo` method spec (`rewards`, `format_regex`) plus, weighted by its
    `reward_model.weight`, the scores of `served` (the served reward model's scorer, which the training
    loop builds: `ftray.rlhf.served.ServedReward`)."""
    return RewardFn(
        weights=dict(m.rewards),
        format_regex=getattr(m, "format_regex", None),
        served=served,
        served_weight=m.reward_model.weight if served else 0.0,
    )
