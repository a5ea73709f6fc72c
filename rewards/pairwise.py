"""Pairwise rewards: ``judge(pixels_a, pixels_b, prompts) -> P(a is better than b)``, Tensor[B] in [0, 1].

Pref-GRPO (Wang et al. 2025) replaces each image's pointwise score by its win rate in its group under a
pairwise judge. A judge sees both images, so it can only be used where two images are compared (GRPO's
``pairwise-winrate`` mode); a pointwise reward becomes a judge through :class:`PointwiseAsPairwise`,
P(a > b) = sigmoid((s_a - s_b) / temperature), a Bradley-Terry reading of its score difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rewards.base import Reward, RewardInfo, check_inputs
from rewards.errors import RewardInputError


def bradley_terry(score_a: torch.Tensor, score_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """P(a > b) = sigmoid((s_a - s_b) / temperature): a pointwise score difference as a preference."""
    return torch.sigmoid((score_a.float() - score_b.float()) / temperature)


class PairwiseReward(nn.Module):
    """Base class of pairwise judges: validates both batches, then calls :meth:`compare`."""

    info: RewardInfo

    def forward(
        self, pixels_a: torch.Tensor, pixels_b: torch.Tensor, prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        if pixels_a.shape != pixels_b.shape:
            raise RewardInputError(
                f"{self.info.name}: the two batches must have one shape, got {tuple(pixels_a.shape)} and "
                f"{tuple(pixels_b.shape)}"
            )
        options = dict(modality=self.info.modality, needs_prompt=self.info.needs_prompt, name=self.info.name)
        prompts = check_inputs(pixels_a, prompts, **options)
        check_inputs(pixels_b, prompts, **options)
        probability = self.compare(pixels_a, pixels_b, prompts)
        if probability.shape != (pixels_a.shape[0],):
            raise RewardInputError(
                f"pairwise reward {self.info.name!r} returned shape {tuple(probability.shape)} for "
                f"{pixels_a.shape[0]} pairs; it must return one probability per pair"
            )
        return probability.float()

    def compare(self, pixels_a: torch.Tensor, pixels_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class PointwiseAsPairwise(PairwiseReward):
    """A pointwise reward as a judge: P(a > b) = sigmoid((s_a - s_b) / temperature)."""

    def __init__(self, reward: Reward, temperature: float = 1.0):
        super().__init__()
        if not isinstance(reward, Reward):
            raise RewardInputError(
                f"PointwiseAsPairwise needs a pointwise reward (rewards.Reward), got {type(reward).__name__}"
            )
        if not temperature > 0:
            raise RewardInputError(f"the temperature must be > 0, got {temperature}")
        self.reward, self.temperature = reward, float(temperature)
        self.info = RewardInfo(
            name=f"{reward.info.name} (pairwise)",
            description=f"sigmoid of the difference of {reward.info.name} scores / {temperature:g}",
            differentiable=reward.info.differentiable,
            modality=reward.info.modality,
            scale="probability that the first image is better",
            typical_range=(0.0, 1.0),
            needs_prompt=reward.info.needs_prompt,
        )

    def from_scores(self, score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
        """The judgement from scores already computed (a group of G needs G reward calls, not G(G-1))."""
        return bradley_terry(score_a, score_b, self.temperature)

    def compare(self, pixels_a: torch.Tensor, pixels_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = self.reward(torch.cat([pixels_a, pixels_b]), prompts + prompts).score
        return self.from_scores(scores[: len(prompts)], scores[len(prompts) :])


def require_pairwise(judge: object, where: str) -> PairwiseReward:
    """``judge`` if it is pairwise; a pointwise reward is an error naming both ways to go on."""
    if isinstance(judge, PairwiseReward):
        return judge
    if isinstance(judge, Reward):
        raise RewardInputError(
            f"{where} needs a pairwise reward (judge(pixels_a, pixels_b, prompts) -> P(a better)), but "
            f"{judge.info.name!r} is pointwise: wrap it with rewards.PointwiseAsPairwise(reward, temperature), "
            "or use the pointwise mode"
        )
    raise RewardInputError(f"{where} needs a pairwise reward, got {type(judge).__name__}")


def require_pointwise(reward: object, where: str) -> Reward:
    """``reward`` if it is pointwise; a pairwise judge is an error naming the alternative."""
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, PairwiseReward):
        raise RewardInputError(
            f"{where} needs a pointwise reward (reward(pixels, prompts) -> scores), but {reward.info.name!r} "
            "compares two images: use it where pairs are judged (grpo.comparison: pairwise-winrate)"
        )
    raise RewardInputError(f"{where} needs a pointwise reward, got {type(reward).__name__}")
