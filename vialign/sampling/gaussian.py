"""The one-step output type and the exact Gaussian log-density every stochastic step uses.

    log N(x'; mu, s^2 I) = -|x' - mu|^2 / (2 s^2) - D log s - (D / 2) log(2 pi)

summed over the D latent dimensions of each sample (docs/algorithms.md, "Notation"). Published GRPO code averages
over dimensions instead (hence its ~1e-4 clip ranges); ``StepOutput.log_prob_per_dim`` gives that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipelines.prediction import per_sample

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Exact log N(x; mean, std^2 I), summed over every dimension but the batch: Tensor[B] (float32)."""
    x, mean = x.float(), mean.float()
    std = per_sample(std, x)
    dims = x[0].numel()
    squared = ((x - mean) ** 2 / (2 * std**2)).flatten(1).sum(1)
    log_std = torch.log(std).reshape(-1) if std.ndim else torch.log(std)
    return -squared - dims * log_std - 0.5 * dims * LOG_2PI


@dataclass
class StepOutput:
    """One sampler step from x_k to x_{k+1}.

    ``std`` is 0 for deterministic (ODE) steps, whose ``log_prob`` is None.
    """

    x_next: torch.Tensor  # [B, ...] float32, x_{k+1}
    mean: torch.Tensor  # [B, ...] float32, E[x_{k+1} | x_k]
    std: torch.Tensor  # 0-d or [B, 1, ...] float32, standard deviation of x_{k+1} | x_k
    log_prob: torch.Tensor | None  # [B] float32, log-density of x_next, summed over latent dims
    x0: torch.Tensor | None = None  # [B, ...] float32, the denoiser's x0 prediction at x_k (sampler_step)

    @property
    def log_prob_per_dim(self) -> torch.Tensor | None:
        """``log_prob`` divided by the number of latent dimensions (the published recipes' convention)."""
        return None if self.log_prob is None else self.log_prob / self.x_next[0].numel()


def deterministic(x_next: torch.Tensor) -> StepOutput:
    return StepOutput(x_next=x_next, mean=x_next, std=torch.zeros((), device=x_next.device), log_prob=None)


def gaussian_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """x_{k+1} ~ N(mean, std^2 I) and its log-density.

    ``prev`` scores a stored x_{k+1} instead of sampling (re-evaluating a trajectory); ``noise`` makes a
    draw replayable (x_{k+1} = mean + std * noise); otherwise noise comes from ``generator``.
    """
    if prev is not None:
        x_next = prev.float()
    else:
        if noise is None:
            noise = torch.randn(
                mean.shape,
                generator=generator,
                dtype=torch.float32,
                device=generator.device if generator is not None else mean.device,
            ).to(mean.device)
        x_next = mean + std * noise.float()
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next, mean, std))
