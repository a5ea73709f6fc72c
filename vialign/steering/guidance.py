"""Reward-gradient guidance (universal guidance, Bansal et al. 2023, arXiv:2302.07121; as diffusers'
CLIP-guided community pipeline; docs/steering.md).

At each guided step, after classifier-free guidance, the gradient of the reward of the decoded x0
prediction w.r.t. the current state, g = grad_{x_t} r(decode(x0_hat(x_t))) (through the denoiser and
the decoder), moves the prediction:

    epsilon models:  eps <- eps - s * sigma_t * g         (sigma_t = sqrt(1 - alpha_bar_t)); v- and
                     x0-prediction models convert to (x0, eps), move eps, and convert back at fixed x_t
    flow models:     v   <- v - s * sigma_t * g           (the same rule on the velocity: an Euler step
                     then moves x by s * sigma_t * (sigma_t - sigma_next) * g, up the reward)

``scale`` = 0 is plain sampling (bitwise). Cost per guided step: one denoiser forward with gradients,
one decoder and reward forward, and their backward pass. Self-recurrence (re-noising and repeating a
step) is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipelines.adapter import GeneratorAdapter
from pipelines.prediction import convert_prediction, per_sample, prediction_output
from pipelines.schedules import Schedule
from vialign.errors import VialignInputError
from vialign.sampling import StepHook
from vialign.steering.common import (
    SamplingSetup,
    SteeringResult,
    check_prompts,
    count_model_calls,
    decode_and_score,
    frozen_weights,
    sample_setup,
    score_latents,
)


@dataclass(frozen=True)
class GuidanceSettings:
    scale: float = 1.0
    start: int = 0  # guide steps [start, stop) ...
    stop: int | None = None  # ... default: to the last

    def problem(self, num_steps: int | None = None) -> str | None:
        if self.scale < 0:
            return f"guidance scale must be >= 0, got {self.scale}"
        stop = self.stop if self.stop is not None else num_steps
        if self.start < 0 or (stop is not None and stop <= self.start):
            return f"guidance steps [{self.start}, {self.stop}) must have 0 <= start < stop"
        if num_steps is not None and stop > num_steps:
            return f"guidance steps [{self.start}, {self.stop}) reach past the {num_steps} steps"
        return None


def guided_output(
    output: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    prediction_type: str,
    scale: float,
) -> torch.Tensor:
    """The model output moved along the reward gradient ``grad`` (the module docstring's rules)."""
    s = per_sample(sigma, x)
    if prediction_type == "flow":
        return output.float() - scale * s * grad
    pred = convert_prediction(output, x, alpha, sigma, prediction_type)
    eps = pred.eps - scale * s * grad
    x0 = (x.float() - s * eps) / per_sample(alpha, x)
    return prediction_output(x0, eps, alpha, sigma, prediction_type)


class RewardGuidance(StepHook):
    """The rollout hook: replaces each guided step's model output by :func:`guided_output`."""

    def __init__(
        self,
        adapter: GeneratorAdapter,
        reward,
        prompts: Sequence[str],
        schedule: Schedule,
        settings: GuidanceSettings,
    ):
        self.adapter, self.reward, self.prompts = adapter, reward, list(prompts)
        self.schedule, self.settings = schedule, settings
        stop = schedule.num_steps if settings.stop is None else settings.stop
        self.steps = range(settings.start, stop)

    def predict(self, k: int, x: torch.Tensor, model: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if k not in self.steps or self.settings.scale == 0:
            return model(x)
        alpha, sigma = self.schedule.alphas[k], self.schedule.sigmas[k]
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            output = model(x_in)
            x0 = convert_prediction(output, x_in, alpha, sigma, self.adapter.prediction_type).x0
            reward = score_latents(self.adapter, self.reward, x0, self.prompts, checkpoint=True)
            (grad,) = torch.autograd.grad(reward.sum(), x_in)
        return guided_output(
            output.detach(), x.float(), grad, alpha, sigma, self.adapter.prediction_type, self.settings.scale
        )


def reward_guidance(
    adapter: GeneratorAdapter,
    reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setup: SamplingSetup,
    *,
    settings: GuidanceSettings = GuidanceSettings(),
    batch_size: int = 8,
) -> SteeringResult:
    """Sample each prompt once from its seed with reward-gradient guidance."""
    check_prompts(prompts, seeds)
    problem = settings.problem(setup.schedule.num_steps)
    if problem:
        raise VialignInputError(problem)
    if not reward.info.differentiable:
        from rewards import require_differentiable

        require_differentiable(reward, "reward guidance")
    latents = []
    with frozen_weights(adapter), count_model_calls(adapter) as calls, torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            hook = RewardGuidance(adapter, reward, batch_prompts, setup.schedule, settings)
            latents.append(
                sample_setup(adapter, batch_prompts, seeds[start : start + batch_size], setup, hook)
            )
    latents = torch.cat(latents)
    pixels, scores = decode_and_score(adapter, reward, latents, prompts, batch_size)
    return SteeringResult(
        latents=latents,
        pixels=pixels,
        reward=scores,
        model_calls=calls[0] / len(prompts),
        details=[{} for _ in prompts],
    )
