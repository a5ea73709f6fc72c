"""Loss transforms for gradient-based alignment (ReFL, DRaFT, AlignProp, ...): options applied to a
reward's score, never copies of the reward.

* ``negate``:  L = -r                 (maximise the reward)
* ``hinge``:   L = relu(margin - r)   (ReFL: stop pushing once r >= margin)
* ``target``:  L = |r - target|       (hit a value, e.g. a brightness)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewards.base import Reward
from rewards.errors import RewardInputError

TRANSFORMS = ("negate", "hinge", "target")


@dataclass(frozen=True)
class LossTransform:
    """Turns scores [B] into per-sample losses [B]."""

    kind: str = "negate"
    margin: float | None = None  # hinge
    target: float | None = None  # target

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORMS:
            raise RewardInputError(
                f"unknown loss transform {self.kind!r}; choose one of {', '.join(TRANSFORMS)}"
            )
        if self.kind == "hinge" and self.margin is None:
            raise RewardInputError("the hinge transform relu(margin - r) needs margin=")
        if self.kind == "target" and self.target is None:
            raise RewardInputError("the target transform |r - target| needs target=")

    def __call__(self, score: torch.Tensor) -> torch.Tensor:
        if self.kind == "negate":
            return -score
        if self.kind == "hinge":
            return torch.relu(self.margin - score)
        return (score - self.target).abs()


def require_differentiable(reward: Reward, purpose: str = "this method") -> None:
    """Raise, naming differentiable alternatives, when ``reward`` cannot give pixel gradients."""
    if reward.info.differentiable:
        return
    from rewards.registry import list_rewards

    alternatives = [info.name for info in list_rewards() if info.differentiable and not info.judge]
    raise RewardInputError(
        f"{purpose} needs gradients of the reward w.r.t. the pixels, but {reward.info.name!r} is not "
        f"differentiable; use one of: {', '.join(alternatives)}"
    )
