"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen 2024, arXiv:2409.08861), for flow and
diffusion models, in the discrete time of the sampler (docs/algorithms.md, "Adjoint Matching").

Fine-tuning as stochastic optimal control needs a *memoryless* noise schedule (the paper's Prop. 1):

* flow models: ``dx = b dt + sigma(t) dW`` with ``b = 2u - x/t``, ``sigma(t) = sqrt(2 (1 - t) / t)`` in the
  paper's time (t = 0 noise, t = 1 data), which is vialign's Flow-SDE with a = sqrt(2);
* diffusion models: DDIM with eta = 1 (DDPM).

A step of either is ``x_{k+1} = mu(x_k) + s_k xi_k``. One training step:

1. roll out the fine-tuned model with that SDE, without gradients (CFG in the rollout);
2. the terminal adjoint ``a_N = -lambda grad_x r(D(x_N))`` (reward multiplier lambda);
3. the *lean adjoint*, backwards with the frozen base model only (eq. 37 of the paper, discretised):
   ``a_k = (d mu_base(x_k) / d x_k)^T a_{k+1}`` = ``a_{k+1} + grad_x <dt b_base(x_k), a_{k+1}>``,
   one vector-Jacobian product per step, so memory does not grow with the number of steps;
4. the regression loss at a stratified subset of steps, with the control of the discrete step
   ``(mu_ft(x_k) - mu_base(x_k)) / s_k`` (= ``(b_ft - b_base) sqrt(h) / sigma``):
   ``L_k = | (mu_ft(x_k) - mu_base(x_k)) / s_k + s_k a_{k+1} |^2``, summed over latent dimensions, averaged
   over the steps; each sample's loss is clipped at an EMA of the batch's 0.9-quantile (outliers carry
   no gradient).

At the optimum the control is ``-s_k a_{k+1} = lambda s_k grad r``: the base model tilted towards
``p_base(x) exp(lambda r(x))``. With the fine-tuned model equal to the base, ``a_k`` is exactly
``-lambda grad_{x_k} r(x_N)`` through the trajectory with its noise held fixed (tested).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.utils.checkpoint
from pydantic import Field, model_validator

from vialign.algorithms.base import Algorithm, TrainingContext, register
from vialign.errors import VialignInputError
from vialign.losses import adjoint_regression, quantile_threshold
from vialign.sampling import Sampler, evaluate_step
from vialign.schema import StrictModel


class AdjointMatchingSettings(StrictModel):
    """The ``adjoint_matching:`` section."""

    prompts_per_step: int = Field(8, ge=1, le=4096, description="samples per training step")
    micro_batch_size: int = Field(8, ge=1, le=4096, description="samples per backward pass")
    reward_multiplier: float = Field(
        100.0, gt=0, description="lambda: the terminal adjoint is -lambda grad r"
    )
    trained_timesteps: int = Field(
        10, ge=1, description="steps of the stratified subset the loss is computed at"
    )
    early_timesteps: int | None = Field(
        None,
        ge=0,
        description="soc-fine-tuning-sd's split: this many of the trained_timesteps drawn (without replacement) "
        "from the first early_fraction of the chain, the rest from the remainder; null: stratified bins",
    )
    early_fraction: float = Field(0.6, gt=0, lt=1, description="where the split cuts the chain")
    clip_quantile: float = Field(
        0.9, gt=0, le=1, description="per-sample losses clipped at an EMA of this quantile"
    )
    clip_ema: float = Field(0.9, ge=0, lt=1, description="EMA decay of the clipping threshold (0: off)")
    cfg_in_loss: bool = Field(
        False, description="use CFG in the adjoint and the loss too (default: rollout only)"
    )
    buffer_passes: int = Field(
        1, ge=1, le=100, description="optimizer passes over each batch of trajectories"
    )

    @model_validator(mode="after")
    def _split_fits(self) -> AdjointMatchingSettings:
        if self.early_timesteps is not None and self.early_timesteps > self.trained_timesteps:
            raise ValueError(
                f"early_timesteps ({self.early_timesteps}) must be <= trained_timesteps ({self.trained_timesteps})"
            )
        return self


def memoryless_sampler(kind: str) -> Sampler:
    """The memoryless SDE of a model kind: Flow-SDE with a = sqrt(2), or DDIM with eta = 1."""
    if kind == "flow":
        return Sampler(sde="flow-sde", noise_level=math.sqrt(2.0))
    return Sampler(sde="ddim", noise_level=1.0)


def step_mean(adapter, schedule, sampler, k: int, x: torch.Tensor, cond, guidance, uncond):
    """(mu(x_k), s_k) of step k of a stochastic sampler."""
    out = evaluate_step(
        adapter,
        schedule,
        sampler,
        k,
        x,
        cond,
        guidance=guidance,
        uncond=uncond,
        stochastic=True,
        noise=torch.zeros_like(x),
    )
    return out.mean, out.std


def lean_adjoint(
    adapter, schedule, sampler, latents: torch.Tensor, terminal: torch.Tensor, cond, guidance, uncond=None
) -> torch.Tensor:
    """Adjoints a_0 .. a_N [B, N+1, ...] from ``a_N = terminal`` by one VJP of the step mean per step, with
    whatever weights the adapter holds (call it inside ``trainer.reference()`` for the base model)."""
    num_steps = latents.shape[1] - 1
    adjoints = torch.empty_like(latents)
    adjoints[:, num_steps] = terminal
    a = terminal
    for k in reversed(range(num_steps)):
        x = latents[:, k].detach().requires_grad_(True)
        with torch.enable_grad():
            mean, _ = step_mean(adapter, schedule, sampler, k, x, cond, guidance, uncond)
            (a,) = torch.autograd.grad(mean, x, grad_outputs=a)
        adjoints[:, k] = a
    return adjoints


def regression_loss(adapter, schedule, sampler, latents, adjoints, steps, cond, guidance, uncond, reference):
    """Per-sample ``mean_k adjoint_regression(mu_ft(x_k), mu_base(x_k), s_k, a_{k+1})`` over ``steps``,
    differentiable w.r.t. the fine-tuned weights. Each step's denoiser call is checkpointed, so the graph
    kept until the backward pass is one latent-sized tensor per step: memory does not grow with the number
    of steps. ``reference`` is a context-manager factory that puts the base model in place."""
    per_sample = torch.zeros(latents.shape[0], device=adapter.device)
    for k in steps:
        x = latents[:, k]
        with torch.no_grad(), reference():
            base_mean, std = step_mean(adapter, schedule, sampler, k, x, cond, guidance, uncond)

        def fine_tuned_mean(x_in: torch.Tensor, k: int = k) -> torch.Tensor:
            return step_mean(adapter, schedule, sampler, k, x_in, cond, guidance, uncond)[0]

        mean = torch.utils.checkpoint.checkpoint(fine_tuned_mean, x, use_reentrant=False)
        per_sample = per_sample + adjoint_regression(mean, base_mean, std, adjoints[:, k + 1]) / len(steps)
    return per_sample


def split_steps(
    num_steps: int, count: int, early: int, fraction: float, generator: torch.Generator
) -> list[int]:
    """soc-fine-tuning-sd's loss steps (am_trainer.py at 489f904): ``early`` steps drawn without
    replacement from [0, round(fraction N)), the other ``count - early`` from [round(fraction N), N)."""
    middle = round(num_steps * fraction)
    if not (early <= middle and count - early <= num_steps - middle):
        raise VialignInputError(
            f"cannot draw {early} of {count} loss steps from the first {middle} of {num_steps} steps and the "
            f"rest from the last {num_steps - middle}: change adjoint_matching.early_timesteps or trained_timesteps"
        )
    first = torch.randperm(middle, generator=generator)[:early]
    second = middle + torch.randperm(num_steps - middle, generator=generator)[: count - early]
    return sorted(int(k) for k in torch.cat([first, second]))


def stratified_steps(num_steps: int, count: int, generator: torch.Generator) -> list[int]:
    """``count`` steps, one drawn uniformly from each of ``count`` equal bins of [0, num_steps)."""
    count = min(count, num_steps)
    edges = torch.linspace(0, num_steps, count + 1)
    steps = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
        low_i, high_i = int(math.floor(low)), max(int(math.floor(low)) + 1, int(math.floor(high)))
        steps.append(int(torch.randint(low_i, high_i, (), generator=generator)))
    return sorted(set(steps))


@register
class AdjointMatching(Algorithm):
    """See the module docstring."""

    name = "adjoint_matching"
    Settings = AdjointMatchingSettings
    reward = "differentiable"

    @classmethod
    def needs_reference(cls, settings) -> bool:
        return True  # the lean adjoint and the loss use the base model

    def __init__(self, settings: AdjointMatchingSettings, context: TrainingContext):
        super().__init__(settings, context)
        self.schedule = context.schedule
        self.sampler = memoryless_sampler(context.adapter.kind)
        self.loss_guidance = (
            context.guidance if settings.cfg_in_loss else replace(context.guidance, cfg_scale=1.0)
        )
        self.clip_threshold: float | None = None

    def state_dict(self) -> dict:
        return {"clip_threshold": self.clip_threshold}

    def load_state_dict(self, state: dict) -> None:
        self.clip_threshold = state.get("clip_threshold")

    def terminal_adjoint(self, final: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_N = -lambda grad_x r(D(x_N)), r): the reward's gradient through the decoder."""
        x = final.detach().requires_grad_(True)
        with torch.enable_grad():
            score = self.context.reward(self.context.adapter.decode(x, checkpoint=True), prompts).score
            (grad,) = torch.autograd.grad(score.sum(), x)
        return -self.settings.reward_multiplier * grad, score.detach()

    def step(self, step: int) -> dict[str, float]:
        context, settings, adapter = self.context, self.settings, self.context.adapter
        prompts, lo, hi = context.step_prompts(step, settings.prompts_per_step)
        started = time.perf_counter()
        parts, scores = [], []
        for start in range(lo, hi, settings.micro_batch_size):  # 1-3: rollouts and adjoints, no weight grads
            end = min(start + settings.micro_batch_size, hi)
            with torch.no_grad():
                trajectory = context.rollout(prompts[start:end], step, start, self.sampler)
            terminal, score = self.terminal_adjoint(trajectory.final, prompts[start:end])
            if not torch.isfinite(score).all():
                raise VialignInputError(
                    f"step {step}: the reward returned NaN or infinite scores; adjoint matching cannot "
                    "skip them (check the reward's inputs, or lower optim.lr)"
                )
            uncond = adapter.uncond_embeds(end - start) if self.loss_guidance.uses_uncond else None
            with context.reference():
                adjoints = lean_adjoint(
                    adapter,
                    self.schedule,
                    self.sampler,
                    trajectory.latents,
                    terminal,
                    trajectory.cond,
                    self.loss_guidance,
                    uncond,
                )
            parts.append((trajectory.latents, adjoints, trajectory.cond, uncond))
            scores.append(score)
        rollout_seconds = time.perf_counter() - started

        generator = torch.Generator().manual_seed(context.sample_seed(step, 2**42))
        if settings.early_timesteps is None:
            steps = stratified_steps(context.num_steps, settings.trained_timesteps, generator)
        else:
            steps = split_steps(
                context.num_steps,
                settings.trained_timesteps,
                settings.early_timesteps,
                settings.early_fraction,
                generator,
            )
        losses = []
        with context.train_mode():
            for _ in range(settings.buffer_passes):  # 4: the regression loss, one optimizer step per pass
                per_sample = [
                    regression_loss(
                        adapter,
                        self.schedule,
                        self.sampler,
                        latents,
                        adjoints,
                        steps,
                        cond,
                        self.loss_guidance,
                        uncond,
                        context.reference,
                    )
                    for latents, adjoints, cond, uncond in parts
                ]
                # one threshold per pass from the losses of the whole global batch: every process clips alike
                global_losses = context.gather(torch.cat(per_sample).detach())
                if settings.clip_quantile < 1.0:
                    self.clip_threshold = quantile_threshold(
                        global_losses, settings.clip_quantile, self.clip_threshold, settings.clip_ema
                    )
                for part in per_sample:
                    clipped = part if settings.clip_quantile >= 1.0 else part.clamp(max=self.clip_threshold)
                    context.backward(clipped.sum() / len(prompts))
                losses.append(global_losses)
                grad_norm = context.optimizer_step(step)
        score = context.gather(torch.cat(scores).float())
        return {
            "reward/mean": float(score.mean()),
            "reward/std": float(score.std(unbiased=False)) if score.numel() > 1 else 0.0,
            "loss": float(torch.cat(losses).mean()),
            "clip_threshold": self.clip_threshold if self.clip_threshold is not None else float("nan"),
            "grad_norm": grad_norm,
            "trained_steps": len(steps),
            "time/rollout_s": rollout_seconds,
            "time/train_s": time.perf_counter() - started - rollout_seconds,
        }
