"""Sampling steps for flow models (SD3, FLUX, Wan, ...), as pure functions.

Convention (diffusers): sigma runs from 1 (noise) to 0 (data), ``x_s = (1 - s) x0 + s eps``, the
network predicts the velocity ``v = eps - x0``, so ``x0_hat = x - s v`` and ``eps_hat = x + (1 - s) v``.
A step goes from ``s`` to ``s' < s`` with ``dt = s' - s < 0``. All math is float32 (coefficients in
float64, then rounded once); ``s`` and ``s'`` may be scalars or per-sample [B] tensors.

* ODE (Euler):  x' = x + dt v.                              (= FlowMatchEulerDiscreteScheduler.step)
* SDE:          x' ~ N(x + [v + g^2 / (2 s) eps_hat] dt,  g^2 |dt|)
  the reverse-time SDE whose marginals match the ODE for any diffusion coefficient g:
  - Flow-SDE, Flow-GRPO (arXiv:2505.05470, eq. 9):  g = a sqrt(s / (1 - s)), a ~ 0.7 (SD3); at s = 1
    the denominator uses s' (the reference code's ``sigma_max = sigmas[1]``);
  - Dance-SDE, DanceGRPO (arXiv:2505.07818, the ``flux_step`` SDE solver):  g = eta, constant (0.3).
* CPS, coefficient-preserving sampling (arXiv:2509.05952):  std = s' sin(a pi / 2),
  x' ~ N((1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat, std^2); the reference code drops the Gaussian
  normalisation of its log-prob, here it is the true Gaussian log-density.
"""

from __future__ import annotations

import math

import torch

from pipelines.prediction import per_sample
from vialign.sampling.gaussian import StepOutput, deterministic, gaussian_step


def _coefficients(x: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor):
    s = per_sample(sigma, x).double()
    s_next = per_sample(sigma_next, x).double()
    return s, s_next


def flow_ode_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> StepOutput:
    """Euler step of the flow ODE: x' = x + (s' - s) v."""
    s, s_next = _coefficients(x, sigma, sigma_next)
    return deterministic(x.float() + (s_next - s).float() * v.float())


def _flow_sde(x, v, s, s_next, g, noise, prev, generator) -> StepOutput:
    dt = s_next - s  # < 0
    x, v = x.float(), v.float()
    eps_hat = x + (1 - s).float() * v
    mean = x + (v + (g**2 / (2 * s)).float() * eps_hat) * dt.float()
    std = (g * torch.sqrt(-dt)).float()
    return gaussian_step(mean, std, noise=noise, prev=prev, generator=generator)


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float = 0.7,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Flow-GRPO's SDE step, g = a sqrt(s / (1 - s)) with ``a = noise_level``.

    ``prev`` scores a stored x' (re-evaluation); ``noise`` replays a draw; else ``generator`` draws.
    """
    s, s_next = _coefficients(x, sigma, sigma_next)
    denominator = 1 - torch.where(s >= 1, s_next, s)  # at s = 1, 1 - s = 0: use the next sigma
    g = noise_level * torch.sqrt(s / denominator)
    return _flow_sde(x, v, s, s_next, g, noise, prev, generator)


def dance_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float = 0.3,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """DanceGRPO's SDE step: constant diffusion coefficient g = eta = ``noise_level``."""
    s, s_next = _coefficients(x, sigma, sigma_next)
    g = torch.full_like(s, float(noise_level))
    return _flow_sde(x, v, s, s_next, g, noise, prev, generator)


def cps_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float = 0.7,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Coefficient-preserving step: std = s' sin(a pi / 2); deterministic where s' = 0 (the last step)."""
    s, s_next = _coefficients(x, sigma, sigma_next)
    x, v = x.float(), v.float()
    x0_hat = x - s.float() * v
    eps_hat = x + (1 - s).float() * v
    std = s_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - s_next).float() * x0_hat + torch.sqrt(s_next**2 - std**2).float() * eps_hat
    if bool((std == 0).all()):
        return deterministic(mean)
    return gaussian_step(mean, std.float(), noise=noise, prev=prev, generator=generator)
