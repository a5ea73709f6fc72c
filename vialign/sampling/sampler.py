"""Which update each step of a schedule uses: the ODE, or one SDE on a window of steps.

A :class:`Sampler` is plain data (no state, no step counter); :func:`sampler_step` turns a denoiser
output at step ``k`` of a :class:`pipelines.Schedule` into a :class:`StepOutput` with the step
function of the right family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipelines.prediction import convert_prediction, per_sample
from pipelines.schedules import Schedule
from vialign.errors import VialignInputError
from vialign.sampling.ddim import ddim_step
from vialign.sampling.flow import cps_step, dance_sde_step, flow_ode_step, flow_sde_step
from vialign.sampling.gaussian import StepOutput

# SDE kind -> (model kind it applies to, default noise level, what the noise level means)
SDE_KINDS: dict[str, tuple[str, float, str]] = {
    "ddim": ("diffusion", 1.0, "eta (1.0 = DDPM, as DDPO)"),
    "flow-sde": ("flow", 0.7, "a in g = a sqrt(s / (1 - s)) (Flow-GRPO: 0.7 for SD3, 0.9 for FLUX)"),
    "dance-sde": ("flow", 0.3, "eta, the constant diffusion coefficient (DanceGRPO: 0.3 for FLUX)"),
    "cps": ("flow", 0.7, "a in std = s' sin(a pi / 2)"),
}


def sde_window_problem(window: tuple[int, int]) -> str | None:
    """What is wrong with an SDE window, or None: it is [start, stop) with 0 <= start < stop (the one
    rule, for configs and samplers)."""
    start, stop = window
    return None if 0 <= start < stop else "must be [start, stop) with 0 <= start < stop"


def default_sde(model_kind: str) -> str:
    """The SDE of a model kind when none is named: DDIM-eta for diffusion models, Flow-SDE for flow models."""
    return "ddim" if model_kind == "diffusion" else "flow-sde"


@dataclass(frozen=True)
class Sampler:
    """How the steps of a schedule move.

    ``sde=None`` is the deterministic ODE (flow Euler / DDIM). Otherwise ``sde`` names the SDE, its
    ``noise_level`` defaults per kind (``SDE_KINDS``), and only steps in ``sde_window`` = [start, stop)
    are stochastic (all steps when None); the others follow the ODE (Flow-GRPO-Fast, MixGRPO).
    """

    sde: str | None = None
    noise_level: float | None = None
    sde_window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.sde is not None and self.sde not in SDE_KINDS:
            raise VialignInputError(f"unknown SDE kind {self.sde!r}; choose one of {', '.join(SDE_KINDS)}")
        if self.noise_level is not None and self.noise_level < 0:
            raise VialignInputError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.sde_window is not None:
            problem = sde_window_problem(self.sde_window)
            if problem:
                raise VialignInputError(f"sde_window {problem}, got {list(self.sde_window)}")

    @property
    def level(self) -> float:
        """The noise level in use (the kind's default when none was given)."""
        if self.sde is None:
            return 0.0
        return SDE_KINDS[self.sde][1] if self.noise_level is None else float(self.noise_level)

    def check(self, schedule: Schedule) -> None:
        """Raise if this sampler cannot run on ``schedule`` (wrong model kind, window past the end)."""
        if self.sde is not None:
            kind = SDE_KINDS[self.sde][0]
            if kind != schedule.kind:
                choices = [name for name, (k, _, _) in SDE_KINDS.items() if k == schedule.kind]
                raise VialignInputError(
                    f"SDE {self.sde!r} is for {kind} models, but this model is a {schedule.kind} model; "
                    f"use one of {', '.join(choices)}"
                )
        if self.sde_window is not None and self.sde_window[1] > schedule.num_steps:
            raise VialignInputError(
                f"sde_window {list(self.sde_window)} reaches past the last of {schedule.num_steps} steps"
            )

    def stochastic_steps(self, num_steps: int) -> torch.Tensor:
        """[num_steps] bool: which steps draw noise."""
        mask = torch.zeros(num_steps, dtype=torch.bool)
        if self.sde is not None:
            start, stop = self.sde_window if self.sde_window is not None else (0, num_steps)
            mask[start:stop] = True
        return mask


def sde_sampler(
    model_kind: str,
    sde: str | None = None,
    noise_level: float | None = None,
    sde_window: tuple[int, int] | None = None,
) -> Sampler:
    """A stochastic sampler; ``sde=None`` takes the model kind's default (:func:`default_sde`)."""
    return Sampler(sde=sde or default_sde(model_kind), noise_level=noise_level, sde_window=sde_window)


def sampler_step(
    sampler: Sampler,
    schedule: Schedule,
    k: int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    prediction_type: str,
    *,
    stochastic: bool,
    noise: torch.Tensor | None = None,
    prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Step ``k`` (x_k -> x_{k+1}) of ``schedule`` from the denoiser's ``model_output`` at x_k; the
    output's ``x0`` is the denoiser's x0 prediction at x_k (what steering scores)."""
    sigma, sigma_next = schedule.sigmas[k], schedule.sigmas[k + 1]
    alpha, alpha_next = schedule.alphas[k], schedule.alphas[k + 1]
    if schedule.kind == "flow":
        if prediction_type == "flow":
            v = model_output
            x0 = x.float() - per_sample(sigma, x) * v.float()
        else:
            pred = convert_prediction(model_output, x, alpha, sigma, prediction_type)
            v, x0 = pred.velocity, pred.x0
        if not stochastic:
            return replace(flow_ode_step(x, v, sigma, sigma_next), x0=x0)
        step = {"flow-sde": flow_sde_step, "dance-sde": dance_sde_step, "cps": cps_step}[sampler.sde]
        out = step(
            x, v, sigma, sigma_next, noise_level=sampler.level, noise=noise, prev=prev, generator=generator
        )
        return replace(out, x0=x0)
    pred = convert_prediction(model_output, x, alpha, sigma, prediction_type)
    eta = sampler.level if stochastic else 0.0
    out = ddim_step(
        pred.x0,
        pred.eps,
        alpha,
        sigma,
        alpha_next,
        sigma_next,
        eta=eta,
        noise=noise,
        prev=prev,
        generator=generator,
    )
    return replace(out, x0=pred.x0)
