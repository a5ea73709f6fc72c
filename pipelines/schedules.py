"""Noise schedules as plain tensors, read once from a diffusers scheduler.

One convention for every family: the state at step ``k`` of an ``N``-step sampler is

    x_k = alphas[k] * x0 + sigmas[k] * eps,        k = 0 (pure noise) ... N (the sample)

and the denoiser is called at ``timesteps[k]`` (diffusers' own units: 0..999 for UNets, ``1000 * sigma``
for flow transformers). Flow models have ``alphas = 1 - sigmas``; diffusion models are variance
preserving, ``alphas**2 + sigmas**2 = 1`` with ``alphas**2`` the cumulative alpha product.

The scheduler object is only asked for its timesteps once (``set_timesteps`` on a fresh copy); it is
never stepped, so nothing here keeps a step counter. Which schedulers are reproduced exactly:

* ``DDIMScheduler``: timesteps and the "previous timestep" rule of ``DDIMScheduler.step``
  (``t - num_train_timesteps // N``, ``final_alpha_cumprod`` below zero). ``CogVideoXDDIMScheduler``
  (CogVideoX) is the same update on its own SNR-shifted ``alphas_cumprod``.
* ``EulerDiscreteScheduler``: its sigmas (any spacing, Karras/exponential/beta sigmas). Euler in
  sigma space is exactly DDIM in the variance-preserving space with ``alpha_bar = 1 / (1 + sigma^2)``,
  so the same step functions reproduce it; ``init_noise_scale`` carries Euler's initial-noise factor.
* ``FlowMatchEulerDiscreteScheduler``: its sigmas after shifting (static ``shift`` or the
  resolution-dependent ``mu`` that SD3.5 and FLUX pass).

Any other UNet scheduler (PNDM, LMS, DPM-Solver, ...) is replaced by a ``DDIMScheduler`` built from its
config (same betas, spacing and prediction type), and any other flow scheduler by
``FlowMatchEulerDiscreteScheduler``; :func:`stateless_scheduler` says so in a warning. A flow-prediction
``UniPCMultistepScheduler`` (what Wan2.1 ships) becomes flow Euler at its ``flow_shift``: the same
shifted noise levels, on flow Euler's own grid of steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from pipelines.errors import PipelineInputError

logger = logging.getLogger(__name__)

SUPPORTED_DIFFUSION_SCHEDULERS = (DDIMScheduler, EulerDiscreteScheduler, CogVideoXDDIMScheduler)
SUPPORTED_FLOW_SCHEDULERS = (FlowMatchEulerDiscreteScheduler,)


@dataclass(frozen=True)
class Schedule:
    """An N-step sampling schedule; see the module docstring for the convention."""

    kind: Literal["flow", "diffusion"]
    timesteps: torch.Tensor  # [N] float32, the denoiser's time input at each step
    alphas: torch.Tensor  # [N+1] float32, signal coefficient of x_k
    sigmas: torch.Tensor  # [N+1] float32, noise coefficient of x_k
    init_noise_scale: float = 1.0  # x_0 = init_noise_scale * N(0, I) (Euler's linspace/trailing quirk)
    scheduler: str = ""  # the diffusers scheduler class this reproduces

    def __post_init__(self) -> None:
        n = self.timesteps.shape[0]
        if self.alphas.shape != (n + 1,) or self.sigmas.shape != (n + 1,):
            raise ValueError(
                f"Schedule needs N timesteps and N+1 alphas/sigmas, got {n}, "
                f"{tuple(self.alphas.shape)}, {tuple(self.sigmas.shape)}"
            )

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def stateless_scheduler(scheduler: Any, kind: Literal["flow", "diffusion"]) -> Any:
    """A fresh scheduler of a reproduced class, built from ``scheduler``'s config (never stepped)."""
    supported = SUPPORTED_FLOW_SCHEDULERS if kind == "flow" else SUPPORTED_DIFFUSION_SCHEDULERS
    if isinstance(scheduler, supported):
        fresh = type(scheduler).from_config(scheduler.config)
    else:
        replacement = FlowMatchEulerDiscreteScheduler if kind == "flow" else DDIMScheduler
        if kind == "diffusion" and scheduler.config.get("snr_shift_scale") is not None:
            replacement = CogVideoXDDIMScheduler  # CogVideoXDPMScheduler: keep the SNR-shifted schedule
        changes = {}
        if kind == "flow" and scheduler.config.get("flow_shift") is not None:  # UniPC/DPM-Solver flow sigmas
            changes["shift"] = float(scheduler.config.flow_shift)
        logger.warning(
            "The checkpoint's scheduler is %s; vialign's samplers reproduce %s, so it samples with %s "
            "built from the same config (same training schedule, spacing and prediction type%s).",
            type(scheduler).__name__,
            ", ".join(c.__name__ for c in supported),
            replacement.__name__,
            f"; shift={changes['shift']} from its flow_shift" if changes else "",
        )
        fresh = replacement.from_config(scheduler.config, **changes)
    if kind == "flow" and fresh.config.get("stochastic_sampling", False):
        raise PipelineInputError(
            "FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) is not an ODE sampler; vialign adds "
            "noise through its own SDE samplers: set stochastic_sampling to false in the scheduler config "
            "and use --sampler sde"
        )
    return fresh


def schedule_from_scheduler(scheduler: Any, num_steps: int, **set_timesteps_kwargs: Any) -> Schedule:
    """Plain-tensor schedule of a reproduced scheduler for ``num_steps`` steps.

    ``set_timesteps_kwargs`` are what the stock pipeline passes (``mu`` and ``sigmas`` for FLUX, ``mu``
    for dynamically shifted SD3.5).
    """
    if num_steps < 1:
        raise PipelineInputError(f"num_steps must be a positive integer, got {num_steps}")
    fresh = type(scheduler).from_config(scheduler.config)
    if isinstance(fresh, FlowMatchEulerDiscreteScheduler):
        if "sigmas" in set_timesteps_kwargs and set_timesteps_kwargs["sigmas"] is not None:
            fresh.set_timesteps(device="cpu", **set_timesteps_kwargs)
        else:
            fresh.set_timesteps(num_steps, device="cpu", **set_timesteps_kwargs)
        sigmas = fresh.sigmas.to(torch.float32).cpu()
        return Schedule(
            kind="flow",
            timesteps=fresh.timesteps.to(torch.float32).cpu(),
            alphas=1.0 - sigmas,
            sigmas=sigmas,
            scheduler=type(fresh).__name__,
        )
    if num_steps > fresh.config.num_train_timesteps:
        raise PipelineInputError(
            f"num_steps={num_steps} exceeds the model's {fresh.config.num_train_timesteps} training timesteps"
        )
    if isinstance(fresh, (DDIMScheduler, CogVideoXDDIMScheduler)):
        fresh.set_timesteps(num_steps, device="cpu")
        timesteps = fresh.timesteps.cpu()
        _check_timesteps(timesteps, fresh, num_steps)
        alphas_cumprod = fresh.alphas_cumprod.to(torch.float32)
        # DDIMScheduler.step goes from t to t - T // N and ends at final_alpha_cumprod below zero. With
        # "leading" spacing (SD 1.x/2.x, SDXL) and whenever T // N is the timestep gap, that is the next
        # timestep; otherwise diffusers lands between two timesteps, and vialign goes to the next one.
        last_prev = int(timesteps[-1]) - fresh.config.num_train_timesteps // num_steps
        final = alphas_cumprod[last_prev] if last_prev >= 0 else torch.as_tensor(fresh.final_alpha_cumprod)
        alpha_bars = torch.stack([*(alphas_cumprod[int(t)] for t in timesteps), final.to(torch.float32)])
        return Schedule(
            kind="diffusion",
            timesteps=timesteps.to(torch.float32),
            alphas=alpha_bars.sqrt(),
            sigmas=(1.0 - alpha_bars).sqrt(),
            scheduler=type(fresh).__name__,
        )
    if isinstance(fresh, EulerDiscreteScheduler):
        fresh.set_timesteps(num_steps, device="cpu")
        _check_timesteps(fresh.timesteps, fresh, num_steps)
        ve_sigmas = fresh.sigmas.to(torch.float32).cpu()  # [N+1], sigma-space (variance exploding)
        scale = torch.rsqrt(1.0 + ve_sigmas**2)
        init = float(fresh.init_noise_sigma) * float(scale[0])
        return Schedule(
            kind="diffusion",
            timesteps=fresh.timesteps.to(torch.float32).cpu(),
            alphas=scale,
            sigmas=ve_sigmas * scale,
            init_noise_scale=init,
            scheduler="EulerDiscreteScheduler",
        )
    raise PipelineInputError(f"no stateless schedule for {type(fresh).__name__}")


def _check_timesteps(timesteps: torch.Tensor, scheduler: Any, num_steps: int) -> None:
    """diffusers' 'leading' spacing plus steps_offset can reach timestep T (out of 0..T-1) for large N."""
    limit = scheduler.config.num_train_timesteps
    if float(timesteps.max()) > limit - 1:
        raise PipelineInputError(
            f"num_steps={num_steps} gives timestep {float(timesteps.max()):.0f} with this scheduler's "
            f"{scheduler.config.timestep_spacing!r} spacing and steps_offset={scheduler.config.steps_offset}, "
            f"outside the model's 0..{limit - 1}: use fewer steps"
        )


def diffusion_coefficients(scheduler: Any, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of a diffusion model at integer training ``timesteps`` (for training losses)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps.long()]
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
