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
from typing import Literal

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
    combine: Literal["sum", "min"] = "sum",
    **options,
) -> Advantages:
    """Each reward normalised within its groups on its own, then ``sum_j w_j A_j`` (so a reward with a
    large scale cannot drown the others), or with ``combine="min"`` the worst of the ``w_j A_j``: a sample
    scores above its group only when it does so on every reward. A sample is kept when every reward
    keeps it."""
    parts = {name: group_advantages(scores[name], group_ids, **options) for name in weights}
    keep = torch.stack([p.keep for p in parts.values()]).all(0)
    weighted = [weights[name] * part.values for name, part in parts.items()]
    values = torch.stack(weighted).amin(0) if combine == "min" else sum(weighted)
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


def group_pairs(group_ids: torch.Tensor) -> torch.Tensor:
    """Every unordered pair (i, j), i < j, of samples in the same group: [P, 2] indices, group by group."""
    pairs = []
    for g in torch.unique(group_ids):
        members = torch.nonzero(group_ids == g).flatten()
        pairs.append(torch.combinations(members, r=2))
    return torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)


def win_rates(
    prob_first_better: torch.Tensor, pairs: torch.Tensor, group_ids: torch.Tensor, *, hard: bool = True
) -> torch.Tensor:
    """Each sample's win rate against the other members of its group (Pref-GRPO, Wang et al. 2025).

    ``pairs`` [P, 2] lists each unordered pair of a group once (:func:`group_pairs`), and
    ``prob_first_better`` [P] is a pairwise judge's P(pairs[:, 0] is better). ``hard``: a pair is a win
    for the first sample when P > 0.5, for the second when P < 0.5, and half a win each when P = 0.5
    (Pref-GRPO's decision rule, its ties counted 0.5); otherwise the probabilities themselves are summed.
    The win rate is the wins over the G - 1 comparisons of a group of G (a group of one: 0.5). A NaN
    judgement makes both samples' win rates NaN, so GRPO drops the group as for a NaN reward."""
    if pairs.ndim != 2 or pairs.shape[1] != 2 or prob_first_better.shape != pairs.shape[:1]:
        raise ValueError(
            f"pairs must be [P, 2] and probabilities [P], got {tuple(pairs.shape)} and "
            f"{tuple(prob_first_better.shape)}"
        )
    p = prob_first_better.double()
    if hard:
        p = torch.where(p > 0.5, 1.0, torch.where(p < 0.5, 0.0, torch.where(p == 0.5, 0.5, p)))
    wins = torch.zeros(len(group_ids), dtype=torch.float64)
    wins.index_add_(0, pairs[:, 0], p)
    wins.index_add_(0, pairs[:, 1], 1 - p)
    group_index = torch.unique(group_ids, return_inverse=True)[1]
    comparisons = torch.bincount(group_index)[group_index] - 1
    rates = torch.where(comparisons > 0, wins / comparisons.clamp(min=1), torch.full_like(wins, 0.5))
    return rates.float()


def pareto_front(scores: torch.Tensor) -> torch.Tensor:
    """Non-dominated samples of a batch (Parrot, Lee et al. 2024, Sec. 4.2): ``scores`` [N, K], one
    column per reward, higher is better. Sample a dominates b when a >= b on every reward and a > b on at
    least one; samples with equal score vectors do not dominate each other, so both stay."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, K] (one column per reward), got {tuple(scores.shape)}")
    if scores.shape[1] < 2:
        raise ValueError("Pareto selection needs at least two rewards; with one, use the reward itself")
    a, b = scores[:, None, :], scores[None, :, :]
    dominates = (a >= b).all(-1) & (a > b).any(-1)  # [i, j]: i dominates j
    return ~dominates.any(0)


@dataclass
class AdvantageHealth:
    """Signals of a collapsing reward (RewardDance's within-group reward variance; Pref-GRPO's
    "illusory advantages": normalised advantages of +-1 made from near-identical raw scores)."""

    group_std_mean: float  # mean within-group reward std
    near_constant_fraction: float  # share of groups whose spread is below ``tolerance`` x the batch scale
    collapsed: bool  # near_constant_fraction >= 0.5

    def metrics(self) -> dict[str, float]:
        return {
            "health/group_std_mean": self.group_std_mean,
            "health/near_constant_fraction": self.near_constant_fraction,
        }


def advantage_health(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, tolerance: float = 1e-2
) -> AdvantageHealth:
    """Within-group spread of finite rewards, and the share of groups whose std is under ``tolerance``
    times the batch's scale (max of |mean| and std over all finite rewards): such groups still get
    advantages of order 1 after normalisation, from differences the reward cannot mean."""
    finite = torch.isfinite(rewards)
    values = rewards[finite].double()
    scale = max(float(values.abs().mean()), float(values.std(unbiased=False))) if values.numel() else 0.0
    stds = []
    for g in torch.unique(group_ids[finite]):
        members = rewards[(group_ids == g) & finite].double()
        if members.numel() > 1:
            stds.append(float(members.std(unbiased=False)))
    if not stds:
        return AdvantageHealth(0.0, 0.0, False)
    near = sum(std <= tolerance * scale for std in stds) / len(stds)
    return AdvantageHealth(sum(stds) / len(stds), near, near >= 0.5)


def raft_selection(
    rewards: torch.Tensor, group_size: int, *, mode: str = "per_prompt", fraction: float = 0.2
):
    """RAFT's kept samples (Dong et al. 2023, arXiv:2304.06767, Alg. 1): ``per_prompt`` keeps the best of
    each group of ``group_size`` (LMFlow's "local" ranking), ``global`` the top ``fraction`` of the whole
    batch (at least one; its "top" ranking). Ties go to the earlier sample; non-finite rewards are never
    kept (a group with none finite keeps nothing). Returns a bool mask [B]."""
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [B] with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    finite = torch.isfinite(rewards)
    ranked = torch.where(finite, rewards.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    keep = torch.zeros_like(finite)
    if mode == "per_prompt":
        grouped = ranked.view(-1, group_size)
        best = grouped.argmax(1)  # the first maximum
        rows = torch.arange(len(grouped)) * group_size + best
        keep[rows] = True
    elif mode == "global":
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * rewards.numel()))
        order = sorted(range(rewards.numel()), key=lambda i: (-float(ranked[i]), i))  # stable: earlier first
        keep[order[:count]] = True
    else:
        raise ValueError(f"mode must be 'per_prompt' or 'global', got {mode!r}")
    return keep & finite


def rwr_weights(rewards: torch.Tensor, temperature: float = 1.0, *, normalize: str = "none") -> torch.Tensor:
    """Reward-weighted regression weights: ``exp(r / temperature)`` (Flow-RWR, arXiv:2501.13918, Eq. 9;
    ``normalize="none"``), or the same divided by its batch mean (``"batch"``: a softmax over the batch
    times B, so the weights average 1 whatever the reward's level; computed stably). Non-finite rewards
    get weight 0 and stay out of the batch mean."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got {tuple(rewards.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    finite = torch.isfinite(rewards)
    scaled = torch.where(
        finite, rewards.double() / temperature, torch.tensor(float("-inf"), dtype=torch.float64)
    )
    if normalize == "none":
        return scaled.exp().float()
    if normalize == "batch":
        count = int(finite.sum())
        if count == 0:
            return torch.zeros_like(rewards, dtype=torch.float32)
        return (torch.softmax(scaled, 0) * count).float()
    raise ValueError(f"normalize must be 'none' or 'batch', got {normalize!r}")
