"""ReNO: reward-based noise optimisation (Eyring et al. 2024, arXiv:2406.04312; docs/steering.md).

The initial noise z of each image is optimised through the whole sampling chain and the decoder:

    L(z) = -r(decode(x_N(z)))  +  lam * (0.5 |z|^2 - (d - 1) log |z|)

The regulariser is the negative log-density of the chi distribution of |z| for z ~ N(0, I_d) (up to a
constant): it keeps z where Gaussian noise lives. SGD with Nesterov momentum (lr 5, momentum 0.9), the
gradient of each image's z clipped to norm 0.1, ``iterations`` evaluations; the kept sample is the
iterate with the highest reward (iteration 0 is plain sampling, so the reward never ends below it).
Every step is checkpointed (``rollout(grad_steps=N, checkpoint=True)``): memory stays flat in the
number of steps. Each image's z, loss and clipping are its own, so results do not depend on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipelines.adapter import GeneratorAdapter
from vialign.errors import VialignInputError
from vialign.media import reward_layout
from vialign.sampling import rollout
from vialign.steering.common import (
    SamplingSetup,
    SteeringResult,
    check_prompts,
    count_model_calls,
    frozen_weights,
)


@dataclass(frozen=True)
class RenoSettings:
    """ReNO's options (defaults: the reference code's)."""

    iterations: int = 50
    lr: float = 5.0
    momentum: float = 0.9
    grad_clip: float = 0.1
    reg_weight: float = 0.01

    def problem(self) -> str | None:
        if self.iterations < 1:
            return f"ReNO needs >= 1 iterations, got {self.iterations}"
        if self.lr <= 0 or self.grad_clip <= 0 or not 0 <= self.momentum < 1 or self.reg_weight < 0:
            return "ReNO needs lr > 0, grad_clip > 0, 0 <= momentum < 1 and reg_weight >= 0"
        return None


def chi_regularizer(z: torch.Tensor) -> torch.Tensor:
    """0.5 |z|^2 - (d - 1) log |z| per sample ([B], float32): -log chi_d(|z|) + const."""
    norm = torch.linalg.vector_norm(z.float().flatten(1), dim=1)
    dims = z[0].numel()
    return 0.5 * norm.square() - (dims - 1) * torch.log(norm)


def reno(
    adapter: GeneratorAdapter,
    reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setup: SamplingSetup,
    *,
    settings: RenoSettings = RenoSettings(),
    batch_size: int = 8,
    progress: bool = False,
    on_iteration: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SteeringResult:
    """Optimise each image's initial noise (from its plain seed) for ``reward``; keep the best iterate.

    ``on_iteration(iteration, first_image_index, best_pixels, best_reward)`` is called after each
    evaluation with the best-so-far images of the current batch (e.g. to judge smaller budgets)."""
    check_prompts(prompts, seeds)
    problem = settings.problem()
    if problem:
        raise VialignInputError(problem)
    if not reward.info.differentiable:
        from rewards import require_differentiable

        require_differentiable(reward, "ReNO")
    kept_latents, kept_pixels, kept_reward, details = [], [], [], []
    with frozen_weights(adapter), count_model_calls(adapter) as calls:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            batch_seeds = list(seeds[start : start + batch_size])
            report = (
                None
                if on_iteration is None
                else (lambda i, px, r, start=start: on_iteration(i, start, px, r))
            )
            result = _optimise(adapter, reward, batch_prompts, batch_seeds, setup, settings, progress, report)
            kept_latents.append(result[0])
            kept_pixels.append(result[1])
            kept_reward.append(result[2])
            details.extend(result[3])
    return SteeringResult(
        latents=torch.cat(kept_latents),
        pixels=torch.cat(kept_pixels),
        reward=torch.cat(kept_reward),
        model_calls=calls[0] / len(prompts),
        details=details,
    )


def _step_noise(adapter, seeds, setup: SamplingSetup) -> list[torch.Generator]:
    """With an SDE: the generators as plain sampling holds them after drawing z (the same step noise at
    every iteration, and iteration 0 is the plain SDE sample)."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    adapter.initial_latents(generators, len(seeds), setup.height, setup.width, setup.schedule)
    return generators


def _optimise(
    adapter, reward, prompts, seeds, setup: SamplingSetup, settings: RenoSettings, progress: bool, report=None
):
    batch = len(prompts)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    cond = adapter.encode_prompt(prompts)
    uncond = adapter.uncond_embeds(batch, setup.negative_prompt) if setup.guidance.uses_uncond else None
    z = adapter.initial_latents(generators, batch, setup.height, setup.width, setup.schedule).detach()
    z.requires_grad_(True)
    optimizer = torch.optim.SGD([z], lr=settings.lr, momentum=settings.momentum, nesterov=True)
    best_reward = torch.full((batch,), -math.inf)
    best_latents = torch.zeros_like(z.detach())
    best_pixels: torch.Tensor | None = None
    best_iteration = torch.zeros(batch, dtype=torch.long)
    first_reward = None
    num_steps = setup.schedule.num_steps
    for iteration in tqdm(range(settings.iterations), disable=not progress, desc="ReNO", leave=False):
        optimizer.zero_grad(set_to_none=True)
        last = iteration == settings.iterations - 1
        with torch.set_grad_enabled(not last):
            trajectory = rollout(
                adapter,
                cond,
                z,
                setup.schedule,
                sampler=setup.sampler,
                guidance=setup.guidance,
                uncond=uncond,
                generator=_step_noise(adapter, seeds, setup) if setup.sampler.sde else None,
                grad_steps=0 if last else num_steps,
                checkpoint=True,
            )
            pixels = adapter.decode(trajectory.final, checkpoint=True)
            score = reward(reward_layout(pixels), prompts).score.float()
        if not bool(torch.isfinite(score).all()):
            raise VialignInputError(f"the reward returned NaN or inf at ReNO iteration {iteration}")
        scores = score.detach().cpu()
        if first_reward is None:
            first_reward = scores.clone()
            best_pixels = torch.zeros_like(pixels.detach())
        better = scores > best_reward
        best_reward = torch.where(better, scores, best_reward)
        best_iteration = torch.where(better, torch.full_like(best_iteration, iteration), best_iteration)
        best_latents[better.to(z.device)] = trajectory.final.detach()[better.to(z.device)]
        best_pixels[better.to(pixels.device)] = pixels.detach()[better.to(pixels.device)]
        if report is not None:
            report(iteration, best_pixels, best_reward)
        if last:
            break
        # per-image loss, summed: each z gets exactly its own gradient
        loss = (-score + settings.reg_weight * chi_regularizer(z)).sum()
        loss.backward()
        with torch.no_grad():
            norms = torch.linalg.vector_norm(z.grad.flatten(1), dim=1).clamp(min=1e-12)
            scale = (settings.grad_clip / norms).clamp(max=1.0)
            z.grad.mul_(scale.view(-1, *([1] * (z.ndim - 1))))
        optimizer.step()
    details = [
        {
            "best_iteration": int(best_iteration[i]),
            "initial_reward": float(first_reward[i]),
            "best_reward": float(best_reward[i]),
        }
        for i in range(batch)
    ]
    return best_latents, best_pixels, best_reward, details
