"""Rewards as plug-ins: one small protocol and a registry (see :mod:`mixgrpo.rewards.base`)."""

from .base import (
    Reward,
    check_images,
    check_reward_input,
    check_videos,
    get_reward,
    is_video_reward,
    list_rewards,
    register_reward,
    registered_reward,
    score,
    validate_reward_output,
)
from .centring import CentringReward
from .composition import CompositionReward
from .composition_v1 import CompositionV1Reward
from .flatness import FlatnessReward
from .imagereward import ImageRewardReward
from .motion import MotionCompositionReward
from .official import OfficialHPS, OfficialImageReward
from .preference import CLIPScoreReward, HPSv21Reward, PickScoreReward
from .video import PerFrameReward, TemporalConsistencyReward
from .vlm_judge import VLMJudgeReward

__all__ = [
    "CLIPScoreReward",
    "CentringReward",
    "CompositionReward",
    "CompositionV1Reward",
    "FlatnessReward",
    "HPSv21Reward",
    "ImageRewardReward",
    "MotionCompositionReward",
    "OfficialHPS",
    "OfficialImageReward",
    "PerFrameReward",
    "PickScoreReward",
    "Reward",
    "TemporalConsistencyReward",
    "VLMJudgeReward",
    "check_images",
    "check_reward_input",
    "check_videos",
    "get_reward",
    "is_video_reward",
    "list_rewards",
    "register_reward",
    "registered_reward",
    "score",
    "validate_reward_output",
]
