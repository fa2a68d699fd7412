"""Rewards as plug-ins: one small protocol and a registry (see :mod:`mixgrpo.rewards.base`)."""

from .base import (
    Reward,
    check_images,
    get_reward,
    list_rewards,
    register_reward,
    score,
    validate_reward_output,
)
from .composition import CompositionReward
from .flatness import FlatnessReward

__all__ = [
    "CompositionReward",
    "FlatnessReward",
    "Reward",
    "check_images",
    "get_reward",
    "list_rewards",
    "register_reward",
    "score",
    "validate_reward_output",
]
