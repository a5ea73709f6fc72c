"""Sequential Monte Carlo / Feynman-Kac steering (Singhal et al. 2025, "A General Framework for
Inference-time Scaling and Steering of Diffusion Models", arXiv:2501.06848; docs/steering.md).

N particles of each prompt run through a stochastic sampler. At the resampling steps
``start, start + every, ..., <= end`` and the last step, the reward r of each particle's decoded x0
prediction gives a potential G (``lam`` sharpens it; r_prev is the particle's reward at the previous
resampling step, ``reward_floor`` before the first)::

    max:  G = exp(lam * max(r, r_prev))     add: G = exp(lam * (r + r_prev))
    diff: G = exp(lam * (r - r_prev))       rt:  G = exp(lam * r)

and a particle carries max(r, r_prev) (max), r + r_prev (add) or r (diff, rt) on as its next r_prev. At
the last step, for max / add / rt, G is divided by the product of the particle's earlier potentials (as
the reference code, Fk-Diffusion-Steering ``fkd_class.py``). G is clamped to [0, 1e10] (NaN -> 0; all
zero -> uniform). Particles are resampled multinomially with probabilities G / sum G, within each
prompt's group; with ``adaptive`` only when the effective sample size 1 / sum p^2 < N / 2. The kept
sample of a prompt is its final particle of highest reward.

Resampling uses one generator per prompt (``mix_seed(seed, RESAMPLING_STREAM)``) so a prompt's particles do not depend on the
other prompts in the batch; with lam = 0 and ``adaptive`` nothing is ever resampled and the particles
are plain SDE samples from the candidate seeds, bitwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.adapter import GeneratorAdapter
from vialign.errors import VialignInputError
from vialign.sampling import SDE_KINDS, StepHook
from vialign.seeds import mix_seed
from vialign.steering.common import (
    SamplingSetup,
    SteeringResult,
    candidate_seed,
    check_prompts,
    count_model_calls,
    decode_and_score,
    sample_setup,
    score_latents,
)

POTENTIALS = ("diff", "max", "add", "rt")
RESAMPLING_STREAM = 0x534D43  # "SMC": the resampling generator's seed is mix_seed(prompt seed, this)
MAX_WEIGHT = 1e10


@dataclass(frozen=True)
class SMCSettings:
    """The FK-steering options (defaults: the reference code's)."""

    potential: str = "diff"
    lam: float = 10.0
    every: int = 5  # resample every this many steps ...
    start: int = 0  # ... from this step ...
    end: int | None = None  # ... up to this step (inclusive; default the last), plus always the last step
    adaptive: bool = False  # resample only when ESS < N / 2
    reward_floor: float = 0.0  # r_prev before the first resampling step

    def problem(self, num_steps: int | None = None) -> str | None:
        """What is wrong with these settings (for ``num_steps`` steps), or None."""
        if self.potential not in POTENTIALS:
            return f"unknown SMC potential {self.potential!r}; choose one of {', '.join(POTENTIALS)}"
        if self.every < 1:
            return f"SMC resampling interval (every) must be >= 1, got {self.every}"
        if self.start < 0 or (self.end is not None and self.end < self.start):
            return f"SMC resampling window [{self.start}, {self.end}] must have 0 <= start <= end"
        if num_steps is not None and max(self.start, self.end or 0) >= num_steps:
            return (
                f"SMC resampling window [{self.start}, {self.end}] reaches past the last step "
                f"({num_steps - 1}) of {num_steps} steps"
            )
        return None

    def resampling_steps(self, num_steps: int) -> list[int]:
        end = num_steps - 1 if self.end is None else self.end
        return sorted({*range(self.start, end + 1, self.every), num_steps - 1})


def fk_weights(
    potential: str,
    lam: float,
    reward: torch.Tensor,
    previous: torch.Tensor,
    product: torch.Tensor,
    *,
    last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, carried): the potentials of one resampling step (any shape; the module docstring's formulas),
    clamped, and what each particle carries to the next step as r_prev (max: max(r, r_prev); add:
    r + r_prev; diff, rt: r), as the reference code keeps it."""
    reward, previous, product = reward.double(), previous.double(), product.double()
    if potential == "max":
        carried = torch.maximum(reward, previous)
    elif potential == "add":
        carried = reward + previous
    elif potential in ("diff", "rt"):
        carried = reward
    else:
        raise VialignInputError(f"unknown SMC potential {potential!r}; choose one of {', '.join(POTENTIALS)}")
    weights = torch.exp(lam * (reward - previous)) if potential == "diff" else torch.exp(lam * carried)
    if last and potential != "diff":
        weights = weights / product
    weights = torch.nan_to_num(weights, nan=0.0).clamp(0.0, MAX_WEIGHT)
    return weights, carried


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """1 / sum_i p_i^2 with p = w / sum w, over the last dimension."""
    p = weights / weights.sum(-1, keepdim=True)
    return 1.0 / p.square().sum(-1)


def resample_indices(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Multinomial resampling by the inverse CDF: particle j's ancestor is the first i with
    ``uniforms[j] < sum_{i' <= i} w_i' / sum w`` (all-zero weights count as uniform)."""
    weights = weights.double()
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    cdf = torch.cumsum(weights, 0) / weights.sum()
    index = torch.searchsorted(cdf, uniforms.double(), right=True)
    return index.clamp(max=len(weights) - 1)


class FKSteering(StepHook):
    """The rollout hook: scores x0 predictions at the resampling steps, resamples within groups."""

    def __init__(
        self,
        adapter: GeneratorAdapter,
        reward,
        prompts: Sequence[str],
        group_seeds: Sequence[int],
        particles: int,
        settings: SMCSettings,
        num_steps: int,
    ):
        self.adapter, self.reward, self.prompts = adapter, reward, list(prompts)
        self.settings, self.particles, self.num_steps = settings, particles, num_steps
        self.groups = len(group_seeds)
        self.steps = set(settings.resampling_steps(num_steps))
        self.generators = [torch.Generator().manual_seed(mix_seed(s, RESAMPLING_STREAM)) for s in group_seeds]
        shape = (self.groups, particles)
        self.previous = torch.full(shape, float(settings.reward_floor), dtype=torch.float64)
        self.product = torch.ones(shape, dtype=torch.float64)
        self.log: list[dict] = []  # per resampling step: step, ESS per group, resampled groups

    def resample(self, k: int, x_next: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor | None:
        if k not in self.steps:
            return None
        settings = self.settings
        with torch.no_grad():
            reward = score_latents(self.adapter, self.reward, x0_hat, self.prompts).cpu().double()
        reward = reward.view(self.groups, self.particles)
        last = k == self.num_steps - 1
        weights, carried = fk_weights(
            settings.potential, settings.lam, reward, self.previous, self.product, last=last
        )
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
        ess = effective_sample_size(weights)
        ancestors = torch.arange(self.groups * self.particles).view(self.groups, self.particles)
        resampled = []
        for g in range(self.groups):
            uniforms = torch.rand(self.particles, generator=self.generators[g], dtype=torch.float64)
            if settings.adaptive and float(ess[g]) >= 0.5 * self.particles:
                self.previous[g] = carried[g]
                continue
            index = resample_indices(weights[g], uniforms)
            ancestors[g] = g * self.particles + index
            self.previous[g] = carried[g, index]
            self.product[g] = self.product[g, index] * weights[g, index]
            resampled.append(g)
        self.log.append({"step": k, "ess": ess.tolist(), "resampled_groups": resampled})
        return ancestors.flatten() if resampled else None


def smc(
    adapter: GeneratorAdapter,
    reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setup: SamplingSetup,
    *,
    particles: int = 4,
    settings: SMCSettings = SMCSettings(),
    batch_size: int = 8,
) -> SteeringResult:
    """FK steering with ``particles`` per prompt; ``setup.sampler`` must be an SDE. ``batch_size`` is in
    particles (whole prompts at a time: at least ``particles``)."""
    check_prompts(prompts, seeds)
    if particles < 1:
        raise VialignInputError(f"SMC needs >= 1 particles, got {particles}")
    if setup.sampler.sde is None:
        raise VialignInputError(
            "SMC resamples stochastic particles, but the sampler is the deterministic ODE: use an SDE "
            f"(sampler.kind=sde, one of {', '.join(SDE_KINDS)})"
        )
    problem = settings.problem(setup.schedule.num_steps)
    if problem:
        raise VialignInputError(problem)
    per_batch = max(1, batch_size // particles)
    latents, hooks = [], []
    with count_model_calls(adapter) as calls, torch.no_grad():
        for start in range(0, len(prompts), per_batch):
            group_prompts = list(prompts[start : start + per_batch])
            group_seeds = list(seeds[start : start + per_batch])
            rows_prompts = [p for p in group_prompts for _ in range(particles)]
            rows_seeds = [candidate_seed(s, j) for s in group_seeds for j in range(particles)]
            hook = FKSteering(
                adapter, reward, rows_prompts, group_seeds, particles, settings, setup.schedule.num_steps
            )
            latents.append(sample_setup(adapter, rows_prompts, rows_seeds, setup, hook))
            hooks.append(hook)
    latents = torch.cat(latents)
    rows_prompts = [p for p in prompts for _ in range(particles)]
    pixels, scores = decode_and_score(adapter, reward, latents, rows_prompts, batch_size)
    grouped = scores.view(len(prompts), particles)
    best = grouped.argmax(dim=1)
    keep = torch.arange(len(prompts)) * particles + best.cpu()
    details = []
    for i in range(len(prompts)):
        hook = hooks[i // per_batch]
        g = i % per_batch
        details.append(
            {
                "chosen": int(best[i]),
                "particle_rewards": grouped[i].tolist(),
                "resampled_at": [e["step"] for e in hook.log if g in e["resampled_groups"]],
            }
        )
    return SteeringResult(
        latents=latents[keep],
        pixels=pixels[keep],
        reward=scores[keep],
        model_calls=calls[0] / len(prompts),
        details=details,
    )
