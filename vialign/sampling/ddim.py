"""DDIM steps for diffusion models (SD 1.x/2.x, SDXL), as pure functions.

Convention: variance preserving, ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t^2 = alpha_bar_t``
(the cumulative alpha product) and ``alpha_t^2 + sigma_t^2 = 1``; a step goes from (alpha, sigma) to
(alpha', sigma') with alpha' > alpha. Paper symbols (Song et al., arXiv:2010.02502, eq. 12 and 16):
``alpha_bar`` is their alpha_t, ``std`` their sigma_t(eta):

    std  = eta * sqrt((1 - alpha_bar') / (1 - alpha_bar)) * sqrt(1 - alpha_bar / alpha_bar')
         = eta * (sigma' / sigma) * sqrt(1 - alpha^2 / alpha'^2)
    mean = alpha' x0_hat + sqrt(sigma'^2 - std^2) eps_hat,      x' ~ N(mean, std^2 I)

eta = 0 is the DDIM ODE (DDIMScheduler.step; EulerDiscreteScheduler.step is the same update in
sigma space), eta = 1 is DDPM's ancestral sampler, DDPO's "DDIM with log-prob" uses this family.
"""

from __future__ import annotations

import torch

from pipelines.prediction import per_sample
from vialign.sampling.gaussian import StepOutput, deterministic, gaussian_step


def ddim_std(alpha, sigma, alpha_next, sigma_next, eta: float) -> torch.Tensor:
    """Standard deviation of the DDIM-eta step (float64 for the coefficient arithmetic)."""
    ratio = torch.clamp(1 - alpha**2 / alpha_next**2, min=0.0)
    return eta * (sigma_next / sigma) * torch.sqrt(ratio)


def ddim_step(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    alpha_next: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One DDIM-eta step from x0_hat and eps_hat (float32 math; deterministic when eta = 0).

    ``prev`` scores a stored x' (re-evaluation); ``noise`` replays a draw; else ``generator`` draws.
    """
    a, s = per_sample(alpha, x0_hat).double(), per_sample(sigma, x0_hat).double()
    a_next, s_next = per_sample(alpha_next, x0_hat).double(), per_sample(sigma_next, x0_hat).double()
    std = ddim_std(a, s, a_next, s_next, eta) if eta > 0 else torch.zeros_like(s)
    direction = torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0))
    mean = a_next.float() * x0_hat.float() + direction.float() * eps_hat.float()
    if eta == 0 or bool((std == 0).all()):
        return deterministic(mean)
    return gaussian_step(mean, std.float(), noise=noise, prev=prev, generator=generator)
