"""Weighted sums of rewards: ``rewards.combine({"pickscore": 1.0, "aesthetic": 0.1})``.

The total is ``sum_i w_i r_i``; ``dims`` holds every component's unweighted score under its name,
and a multi-dimensional component's own dimensions as ``"<name>/<dim>"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.errors import RewardInputError


class CombinedReward(Reward):
    def __init__(self, components: Mapping[str, Reward], weights: Mapping[str, float]):
        super().__init__()
        if not components:
            raise RewardInputError("combine needs at least one reward")
        self.components = nn.ModuleDict(dict(components))
        self.weights = {name: float(weights[name]) for name in components}
        infos = [reward.info for reward in components.values()]
        modalities = {info.modality for info in infos}
        modality = (
            "image+video"
            if modalities == {"image+video"}
            else ("video" if "video" in modalities else "image")
        )
        low = sum(
            min(w * i.typical_range[0], w * i.typical_range[1]) for w, i in zip(self.weights.values(), infos)
        )
        high = sum(
            max(w * i.typical_range[0], w * i.typical_range[1]) for w, i in zip(self.weights.values(), infos)
        )
        self.info = RewardInfo(
            name=" + ".join(f"{w:g}*{n}" for n, w in self.weights.items()),
            description="weighted sum of " + ", ".join(self.weights),
            differentiable=all(i.differentiable for i in infos),
            modality=modality,
            scale="sum of weighted component scores",
            typical_range=(low, high),
            needs_prompt=any(i.needs_prompt for i in infos),
        )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        total = torch.zeros(pixels.shape[0], device=pixels.device)
        dims: dict[str, torch.Tensor] = {}
        for name, reward in self.components.items():
            out = reward(pixels, prompts)
            total = total + self.weights[name] * out.score.to(total.device)
            dims[name] = out.score
            dims.update({f"{name}/{dim}": value for dim, value in out.dims.items()})
        return RewardOutput(total, dims)


def combine(
    weights: Mapping[str, float],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    rewards: Mapping[str, Reward] | None = None,
) -> CombinedReward:
    """A weighted sum of rewards by name. ``options[name]`` are passed to ``load_reward(name, ...)``;
    ``rewards[name]`` supplies an already-built reward instead of loading one."""
    from rewards.registry import load_reward

    options, rewards = dict(options or {}), dict(rewards or {})
    unknown = set(options) - set(weights)
    if unknown:
        raise RewardInputError(
            f"options given for {sorted(unknown)}, which are not in the combination {list(weights)}"
        )
    components = {
        name: rewards[name] if name in rewards else load_reward(name, **options.get(name, {}))
        for name in weights
    }
    return CombinedReward(components, weights)
