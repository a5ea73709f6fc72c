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

:class:`ShapedReward` applies one of them to any reward (config: ``rewards.<name>.shaping``; the trainer
supplies the reference rewards, docs/algorithms.md "Reward shaping").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from rewards.base import Reward, RewardOutput
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
        self.update(r)
        return self.clamp(r)

    def update(self, r: torch.Tensor) -> None:
        """Add the rewards ``r`` [B] to the running statistics."""
        _check(r)
        for value in r.detach().double().tolist():
            if not math.isfinite(value):
                continue  # a NaN stays NaN in the output and never enters the statistics
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    def clamp(self, r: torch.Tensor) -> torch.Tensor:
        """``r`` clipped to the running mean -/+ the running std (no update)."""
        _check(r)
        sigma = math.sqrt(self.m2 / self.count) if self.count else 0.0
        return r.clamp(self.mean - sigma, self.mean + sigma)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


SHAPING_KINDS = ("par", "centered", "delta", "ceiling", "clip")  # delta: another name of centered
REFERENCE_KINDS = ("par", "centered", "delta")  # the kinds that need references(prompts)

References = Callable[[list[str]], torch.Tensor]  # prompts [B] -> reference rewards [B, M]
Gather = Callable[[torch.Tensor], torch.Tensor]  # this process's [B] -> every process's, in global order


class ShapedReward(Reward):
    """``inner`` with a shaping transform applied to its score; ``dims`` keeps the untransformed score as
    ``"raw"`` (and the inner reward's own dimensions).

    - ``par``:     mean_m sigmoid(k (r - r_ref_m)), r_ref = ``references(prompts)`` [B, M]
    - ``centered`` (or ``delta``, the same): r - mean_m r_ref_m
    - ``ceiling``: min(r, value)
    - ``clip``:    clip(r, mu - sigma, mu + sigma), mu and sigma running over every reward seen (a
      :class:`RunningClip`); ``gather`` makes the statistics those of the global batch when several
      processes each score a share of it (every process must then call the reward alike).

    ``references`` is supplied by the caller (a trainer samples its reference policy); rewards never import
    vialign. The clip's running statistics are :meth:`shaping_state` / :meth:`load_shaping_state`.
    """

    def __init__(
        self,
        inner: Reward,
        kind: str,
        *,
        k: float = 1.0,
        value: float | None = None,
        references: References | None = None,
        gather: Gather | None = None,
    ):
        super().__init__()
        if kind not in SHAPING_KINDS:
            raise RewardInputError(f"unknown shaping kind {kind!r}; choose one of {', '.join(SHAPING_KINDS)}")
        if kind in REFERENCE_KINDS and references is None:
            raise RewardInputError(f"shaping {kind!r} needs references(prompts) -> reference rewards [B, M]")
        if kind == "ceiling" and value is None:
            raise RewardInputError("shaping 'ceiling' needs a value (the ceiling c in min(r, c))")
        if kind == "par" and not k > 0:
            raise RewardInputError(f"shaping 'par' needs k > 0, got {k}")
        self.inner, self.kind, self.k, self.value = inner, kind, float(k), value
        self.references, self.gather = references, gather
        self.clip = RunningClip() if kind == "clip" else None
        info = inner.info
        low, high = info.typical_range
        cap = float(value) if value is not None else high
        typical = {
            "par": (0.0, 1.0),
            "centered": (low - high, high - low),
            "delta": (low - high, high - low),
            "ceiling": (min(low, cap), min(high, cap)),
            "clip": (low, high),
        }[kind]
        formula = {
            "par": f"mean_m sigmoid({self.k:g} (r - r_ref_m))",
            "centered": "r - mean_m r_ref_m",
            "delta": "r - mean_m r_ref_m",
            "ceiling": f"min(r, {value!r})",
            "clip": "clip(r, running mean -/+ running std)",
        }[kind]
        self.info = replace(
            info,
            name=f"{kind}({info.name})",
            description=f"{info.description}, shaped: {formula}",
            scale=f"{formula} of r = {info.scale}",
            typical_range=typical,
            needs_prompt=info.needs_prompt or kind in REFERENCE_KINDS,
        )

    def transform(self, r: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The shaped rewards of raw rewards ``r`` [B] for ``prompts``."""
        if self.kind == "ceiling":
            return ceiling(r, self.value)
        if self.kind == "clip":
            self.clip.update(self.gather(r.detach()) if self.gather is not None else r)
            return self.clip.clamp(r)
        references = torch.as_tensor(self.references(list(prompts))).to(r.device, r.dtype)
        return par(r, references, self.k) if self.kind == "par" else centered(r, references)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        out = self.inner(pixels, prompts)
        shaped = self.transform(out.score, prompts)
        return RewardOutput(shaped, {**out.dims, "raw": out.score})

    def shaping_state(self) -> dict[str, Any]:
        """JSON-serialisable state (the clip's running statistics; nothing for the other kinds)."""
        return {"clip": self.clip.state_dict()} if self.clip is not None else {}

    def load_shaping_state(self, state: dict[str, Any]) -> None:
        if self.clip is not None and "clip" in state:
            self.clip.load_state_dict(state["clip"])
