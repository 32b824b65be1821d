"""Reward plugins: videos [B, T, C, H, W] in [0, 1] + prompts in, one float score per video out.

``import rewards`` stays light: model-based rewards import open_clip / transformers inside their loaders.
Importing the built-in modules below registers their rewards.
"""

from rewards import clip, pickscore, toy_fidelity, videoalign, weight_free  # noqa: F401  (registration side effect)
from rewards.base import FunctionReward, PerFrameReward, Reward, TRLReward
from rewards.ensemble import RewardError, RewardSet, RewardSetConfig, RewardSpec, ScoreHandle, ScoreTable
from rewards.registry import ENTRY_POINT_GROUP, available, build, register_reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "FunctionReward",
    "PerFrameReward",
    "Reward",
    "RewardError",
    "RewardSet",
    "RewardSetConfig",
    "RewardSpec",
    "ScoreHandle",
    "ScoreTable",
    "TRLReward",
    "available",
    "build",
    "register_reward",
]
