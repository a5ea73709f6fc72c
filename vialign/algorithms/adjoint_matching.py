"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen 2024, arXiv:2409.08861), for flow and
diffusion models, in the discrete time of the sampler (DESIGN.md sections 4 and 5).

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

from vialign.sampling import Sampler


def memoryless_sampler(kind: str) -> Sampler:
    """The memoryless SDE of a model kind: Flow-SDE with a = sqrt(2), or DDIM with eta = 1."""
    if kind == "flow":
        return Sampler(sde="flow-sde", noise_level=math.sqrt(2.0))
    return Sampler(sde="ddim", noise_level=1.0)


def step_mean(adapter, schedule, sampler, k: int, x: torch.Tensor, cond, guidance, uncond):
    """(mu(x_k), s_k) of step k of a stochastic sampler."""
    from vialign.sampling import evaluate_step

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
    """Per-sample ``mean_k |(mu_ft(x_k) - mu_base(x_k)) / s_k + s_k a_{k+1}|^2`` over ``steps``, differentiable
    w.r.t. the fine-tuned weights. Each step's denoiser call is checkpointed, so the graph kept until the
    backward pass is one latent-sized tensor per step: memory does not grow with the number of steps.
    ``reference`` is a context-manager factory that puts the base model in place."""
    per_sample = torch.zeros(latents.shape[0], device=adapter.device)
    for k in steps:
        x = latents[:, k]
        with torch.no_grad(), reference():
            base_mean, std = step_mean(adapter, schedule, sampler, k, x, cond, guidance, uncond)

        def fine_tuned_mean(x_in: torch.Tensor, k: int = k) -> torch.Tensor:
            return step_mean(adapter, schedule, sampler, k, x_in, cond, guidance, uncond)[0]

        mean = torch.utils.checkpoint.checkpoint(fine_tuned_mean, x, use_reentrant=False)
        std = std.reshape(-1, *[1] * (x.ndim - 1)) if std.ndim else std
        residual = (mean - base_mean) / std + std * adjoints[:, k + 1]
        per_sample = per_sample + residual.square().flatten(1).sum(1) / len(steps)
    return per_sample


def stratified_steps(num_steps: int, count: int, generator: torch.Generator) -> list[int]:
    """``count`` steps, one drawn uniformly from each of ``count`` equal bins of [0, num_steps)."""
    count = min(count, num_steps)
    edges = torch.linspace(0, num_steps, count + 1)
    steps = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
        low_i, high_i = int(math.floor(low)), max(int(math.floor(low)) + 1, int(math.floor(high)))
        steps.append(int(torch.randint(low_i, high_i, (), generator=generator)))
    return sorted(set(steps))


class AdjointMatching:
    """``config.algorithm = adjoint_matching``; see the module docstring."""

    def __init__(self, config, trainer):
        self.config, self.trainer, self.settings = config, trainer, config.adjoint
        adapter = trainer.adapter
        self.num_steps = config.sampler.num_steps or adapter.default_num_steps
        self.height, self.width = trainer.image_size()
        self.schedule = adapter.schedule(self.num_steps, self.height, self.width)
        self.sampler = memoryless_sampler(adapter.kind)
        self.guidance = adapter.make_guidance(config.sampler.guidance_scale)
        self.loss_guidance = (
            self.guidance if self.settings.cfg_in_loss else replace(self.guidance, cfg_scale=1.0)
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
            score = self.trainer.reward(self.trainer.adapter.decode(x, checkpoint=True), prompts).score
            (grad,) = torch.autograd.grad(score.sum(), x)
        return -self.settings.reward_multiplier * grad, score.detach()

    def step(self, step: int) -> dict[str, float]:
        from vialign.data import prompts_for_step
        from vialign.errors import VialignInputError
        from vialign.sampling import rollout_prompts
        from vialign.trainer import sample_seed

        trainer, settings, adapter = self.trainer, self.settings, self.trainer.adapter
        seed = self.config.seed
        prompts = prompts_for_step(trainer.train_prompts, step, settings.prompts_per_step, seed)
        lo, hi = trainer.local_range(len(prompts))
        started = time.perf_counter()
        with torch.no_grad():
            adapter.encode_prompt(prompts)
        adapter.unwrapped_denoiser.eval()
        parts, scores = [], []
        for start in range(lo, hi, settings.micro_batch_size):  # 1-3: rollouts and adjoints, no weight grads
            end = min(start + settings.micro_batch_size, hi)
            with torch.no_grad():
                trajectory = rollout_prompts(
                    adapter,
                    prompts[start:end],
                    [sample_seed(seed, step, g) for g in range(start, end)],
                    self.schedule,
                    height=self.height,
                    width=self.width,
                    guidance=self.guidance,
                    sampler=self.sampler,
                )
            terminal, score = self.terminal_adjoint(trajectory.final, prompts[start:end])
            if not torch.isfinite(score).all():
                raise VialignInputError(f"step {step}: the reward returned NaN or infinite scores")
            uncond = adapter.uncond_embeds(end - start) if self.loss_guidance.uses_uncond else None
            with trainer.reference():
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

        generator = torch.Generator().manual_seed(sample_seed(seed, step, 2**42))
        steps = [k for k in stratified_steps(self.num_steps, settings.trained_timesteps, generator)]
        total = len(prompts)
        adapter.unwrapped_denoiser.train()
        losses = []
        for _ in range(settings.buffer_passes):  # 4: the regression loss, one optimizer step per pass
            for latents, adjoints, cond, uncond in parts:
                per_sample = regression_loss(
                    adapter,
                    self.schedule,
                    self.sampler,
                    latents,
                    adjoints,
                    steps,
                    cond,
                    self.loss_guidance,
                    uncond,
                    trainer.reference,
                )
                clipped = self._clip(per_sample)
                (clipped.sum() / total * trainer.world_size).backward()
                losses.append(per_sample.detach())
            trainer.average_gradients()
            grad_norm = trainer.optimizer_step(step)
        adapter.unwrapped_denoiser.eval()
        score = trainer.gather(torch.cat(scores).float())
        loss = torch.cat(losses)
        return {
            "reward/mean": float(score.mean()),
            "reward/std": float(score.std(unbiased=False)) if score.numel() > 1 else 0.0,
            "loss": float(loss.mean()),
            "clip_threshold": self.clip_threshold if self.clip_threshold is not None else float("nan"),
            "grad_norm": grad_norm,
            "trained_steps": len(steps),
            "time/rollout_s": rollout_seconds,
            "time/step_train_s": time.perf_counter() - started - rollout_seconds,
        }

    def _clip(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Clip each sample's loss at an EMA of the batch quantile (outliers carry no gradient)."""
        settings = self.settings
        if settings.clip_quantile >= 1.0:
            return per_sample
        quantile = float(torch.quantile(per_sample.detach().float(), settings.clip_quantile))
        if self.clip_threshold is None or settings.clip_ema == 0:
            self.clip_threshold = quantile
        else:
            self.clip_threshold = settings.clip_ema * self.clip_threshold + (1 - settings.clip_ema) * quantile
        return per_sample.clamp(max=self.clip_threshold)
