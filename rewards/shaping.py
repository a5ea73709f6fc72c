"""Reward shaping against reward hacking: bounded, centred transforms of a reward (Fu et al. 2025, "Reward
Shaping to Mitigate Reward Hacking in RLHF", arXiv 2502.18770; the formulas of its code,
PorUna-byte/PAR@b8caf40 ``trainers/reward_shaper.py``).

``r`` is a batch of rewards [B]; ``references`` [B, M] are, per sample, the rewards of M samples the
reference (pre-trained) policy made for the same prompt.

- :func:`par`:       mean_m sigmoid(k (r - r_ref_m))  -- PAR, the paper's proposal: bounded in (0, 1),
                     centred at 0.5 where the policy matches the reference, flat once far above it.
- :func:`centered`:  r - mean_m r_ref_m                -- the paper's "centered" ablation.
- :func:`ceiling`:   min(r, c)                          -- the "ceiling" ablation.
- :class:`RunningClip`: clip(r, mu - sigma, mu + sigma), mu and sigma running over every reward seen so
                     far, updated with the batch before clipping -- the paper's "Clip" baseline.
"""

from __future__ import annotations

import math

import torch

from rewards.errors import RewardInputError


def _check(r: torch.Tensor, references: torch.Tensor | None = None) -> None:
    if r.ndim != 1:
        raise RewardInputError(f"rewards must be [B], got shape {tuple(r.shape)}")
    if references is not None and (references.ndim != 2 or references.shape[0] != r.shape[0]):
        raise RewardInputError(
            f"references must be [B, M] (M reference rewards per sample), got {tuple(references.shape)} for "
            f"{r.shape[0]} rewards"
        )


def par(r: torch.Tensor, references: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """PAR: mean over the M references of sigmoid(k (r - r_ref))."""
    _check(r, references)
    return torch.sigmoid(k * (r[:, None] - references)).mean(1)


def centered(r: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """r minus the mean of its references."""
    _check(r, references)
    return r - references.mean(1)


def ceiling(r: torch.Tensor, value: float) -> torch.Tensor:
    """min(r, value)."""
    _check(r)
    return r.clamp(max=value)


class RunningClip:
    """clip(r, mu - sigma, mu + sigma) with mu, sigma the mean and (population) std of every reward seen so
    far, this batch included (Welford's update, float64). State is three numbers, for checkpoints."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        _check(r)
        for value in r.detach().double().tolist():
            if not math.isfinite(value):
                continue  # a NaN stays NaN in the output and never enters the statistics
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)
        sigma = math.sqrt(self.m2 / self.count) if self.count else 0.0
        return r.clamp(self.mean - sigma, self.mean + sigma)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
