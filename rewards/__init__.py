"""Reward models behind one interface: ``reward(pixels in [0, 1], prompts) -> RewardOutput``.

    >>> import rewards
    >>> reward = rewards.load_reward("pickscore")              # or pretrained="/local/folder"
    >>> out = reward(pixels, ["a red square", "a cat"])        # pixels: B x 3 x H x W (or B x 3 x T x H x W)
    >>> out.score, out.dims                                     # Tensor[B], {name: Tensor[B]}
    >>> rewards.list_rewards()                                  # names and metadata
    >>> rewards.combine({"pickscore": 1.0, "aesthetic": 0.1})   # weighted sum, components in .dims
    >>> judge = rewards.load_pairwise("vlm-pairwise")           # pairwise: judge(pixels_a, pixels_b, prompts)
    >>> judge(pixels, references, prompts)                      # Tensor[B], P(a is better than b)

``rewards`` never imports ``vialign``.
"""

from rewards.base import Reward, RewardInfo, RewardOutput, check_inputs
from rewards.combine import CombinedReward, combine
from rewards.errors import CheckpointNotFoundError, DamagedCheckpointError, RewardInputError
from rewards.losses import LossTransform, require_differentiable
from rewards.pairwise import (
    PairwiseReward,
    PointwiseAsPairwise,
    bradley_terry,
    require_pairwise,
    require_pointwise,
)
from rewards.registry import (
    list_rewards,
    load_pairwise,
    load_reward,
    pairwise_names,
    register,
    register_pairwise,
)
from rewards.video import FrameSampledReward

__all__ = [
    "CheckpointNotFoundError",
    "DamagedCheckpointError",
    "CombinedReward",
    "FrameSampledReward",
    "LossTransform",
    "PairwiseReward",
    "PointwiseAsPairwise",
    "Reward",
    "RewardInfo",
    "RewardInputError",
    "RewardOutput",
    "bradley_terry",
    "check_inputs",
    "combine",
    "list_rewards",
    "load_pairwise",
    "load_reward",
    "pairwise_names",
    "register",
    "register_pairwise",
    "require_differentiable",
    "require_pairwise",
    "require_pointwise",
]
