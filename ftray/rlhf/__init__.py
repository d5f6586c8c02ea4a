"""Rollout machinery for the learning-from-feedback methods: verifiable reward functions and the client
of a served reward model (a Ray Serve deployment reached through its handle). Methods call `build_reward`;
they never import Ray themselves."""

from ftray.rlhf.rewards import RewardFn, build_reward, last_number, verifiable_rewards

__all__ = ["RewardFn", "build_reward", "last_number", "verifiable_rewards"]
