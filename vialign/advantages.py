"""Group-relative advantages for GRPO-style methods (docs/algorithms.md, "GRPO").

For G samples of one prompt with rewards r_1 .. r_G (group = the samples of one prompt, over all
processes)::

    A_i = (r_i - mean_group(r)) / (std + 1e-4)          std: the group's, or the whole batch's
    A_i <- clip(A_i, -A_max, A_max)                     groups with zero std carry no signal: dropped

Multi-reward: advantages of the weighted sum, or per-reward advantages weighted and summed
(:func:`per_reward_advantages`). DDPO's per-prompt running statistics (Black et al. 2023,
``PerPromptStatTracker``) replace the group statistics by those of a buffer of the prompt's recent rewards.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

STD_EPS = 1e-4


@dataclass
class Advantages:
    values: torch.Tensor  # [B] float32, 0 where dropped
    keep: torch.Tensor  # [B] bool: samples that train (finite rewards, groups with signal)
    zero_std_groups: int  # groups dropped for having no spread
    nonfinite_groups: int  # groups dropped for a NaN / infinite reward
    num_groups: int


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: str = "group",
    clip: float | None = 5.0,
    drop_zero_std: bool = True,
) -> Advantages:
    """Group-normalised advantages of ``rewards`` [B]; ``group_ids`` [B] says which prompt each belongs to.

    ``std="group"`` divides by each group's std (DanceGRPO, Flow-GRPO), ``"global"`` by the std of all
    kept rewards (Dr. GRPO-style; steadier when groups are small). A group with a non-finite reward is
    dropped whole: its mean would be meaningless. Std is the population std (``unbiased=False``), as the
    published code uses ``np.std``.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    rewards = rewards.float()
    groups = torch.unique(group_ids)
    keep = torch.ones_like(rewards, dtype=torch.bool)
    centred = torch.zeros_like(rewards)
    group_std = torch.ones_like(rewards)
    zero_std = nonfinite = 0
    for g in groups:
        members = group_ids == g
        r = rewards[members]
        if not torch.isfinite(r).all():
            keep[members], nonfinite = False, nonfinite + 1
            continue
        spread = r.std(unbiased=False)
        if drop_zero_std and spread == 0:
            keep[members], zero_std = False, zero_std + 1
            continue
        centred[members] = r - r.mean()
        group_std[members] = spread
    if std == "global":
        kept = rewards[keep]
        scale = kept.std(unbiased=False) if kept.numel() > 1 else torch.tensor(0.0)
        values = centred / (scale + STD_EPS)
    else:
        values = centred / (group_std + STD_EPS)
    if clip is not None:
        values = values.clamp(-clip, clip)
    values = torch.where(keep, values, torch.zeros_like(values))
    return Advantages(values, keep, zero_std, nonfinite, len(groups))


def per_reward_advantages(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: torch.Tensor,
    **options,
) -> Advantages:
    """Each reward normalised within its groups on its own, then ``sum_j w_j A_j`` (so a reward with a
    large scale cannot drown the others). A sample is kept when every reward keeps it."""
    parts = {name: group_advantages(scores[name], group_ids, **options) for name in weights}
    keep = torch.stack([p.keep for p in parts.values()]).all(0)
    values = sum(weights[name] * part.values for name, part in parts.items())
    values = torch.where(keep, values, torch.zeros_like(values))
    first = next(iter(parts.values()))
    return Advantages(
        values,
        keep,
        max(p.zero_std_groups for p in parts.values()),
        max(p.nonfinite_groups for p in parts.values()),
        first.num_groups,
    )


class PerPromptStatTracker:
    """DDPO's per-prompt running statistics: the advantage of a reward is its z-score against the last
    ``buffer_size`` rewards seen for the same prompt; until ``min_count`` have been seen, against the
    whole batch. State is plain lists, saved in checkpoints as JSON."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def advantages(
        self, prompts: Sequence[str], rewards: torch.Tensor, *, clip: float | None = 5.0
    ) -> Advantages:
        rewards = rewards.float()
        finite = torch.isfinite(rewards)
        batch = rewards[finite]
        values = torch.zeros_like(rewards)
        for prompt in dict.fromkeys(prompts):
            members = torch.tensor([p == prompt for p in prompts]) & finite
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[members].tolist())
            reference = torch.tensor(list(buffer)) if len(buffer) >= self.min_count else batch
            mean, std = reference.mean(), reference.std(unbiased=False)
            values[members] = (rewards[members] - mean) / (std + STD_EPS)
        if clip is not None:
            values = values.clamp(-clip, clip)
        values = torch.where(finite, values, torch.zeros_like(values))
        nonfinite_prompts = len({p for p, f in zip(prompts, finite.tolist()) if not f})
        return Advantages(values, finite, 0, nonfinite_prompts, len(set(prompts)))

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(b, maxlen=self.buffer_size) for p, b in state["buffers"].items()}
