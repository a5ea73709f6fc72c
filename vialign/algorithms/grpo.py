"""GRPO for diffusion and flow models: DanceGRPO (Xue et al. 2025), Flow-GRPO (Liu et al. 2025), and
their ancestor DDPO (Black et al. 2023) with the DDIM-eta SDE (docs/algorithms.md, "GRPO").

A step: P prompts, G samples each from an SDE, rewards, group-relative advantages A over all processes
(``vialign.advantages``), then for every trained step k of every sample, with the rollout's log-prob
logp_old::

    ratio = exp(logp_theta(x_{k+1} | x_k) - logp_old)
    L     = -min(ratio A, clip(ratio, 1 - c, 1 + c) A) + beta KL(p_theta || p_ref)      (PPO, eq. 7)
    KL    = |mu_theta - mu_ref|^2 / (2 std^2)           (both steps share the std of the schedule)

averaged over samples and trained steps (``vialign.losses.clipped_surrogate``, ``gaussian_kl``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from vialign.advantages import Advantages, PerPromptStatTracker, group_advantages, per_reward_advantages
from vialign.algorithms.base import Algorithm, TrainingContext, register
from vialign.losses import clipped_surrogate, gaussian_kl
from vialign.sampling import Sampler, replay_step, sde_sampler
from vialign.schema import StrictModel

logger = logging.getLogger(__name__)


class GRPOSettings(StrictModel):
    """The ``grpo:`` section."""

    group_size: int = Field(8, ge=2, le=1024, description="samples per prompt (G)")
    prompts_per_step: int = Field(8, ge=1, le=4096, description="prompts per training step (all processes)")
    advantage_std: Literal["group", "global"] = Field("group", description="normalise by group or batch std")
    advantage_clip: float | None = Field(5.0, gt=0, description="clip advantages to +-this (null: off)")
    drop_zero_std_groups: bool = Field(True, description="skip groups whose rewards are all equal")
    per_prompt_stats: bool = Field(False, description="DDPO: z-score against a per-prompt reward buffer")
    stats_buffer_size: int = Field(32, ge=2, description="per_prompt_stats: rewards kept per prompt")
    stats_min_count: int = Field(16, ge=1, description="per_prompt_stats: below this, use batch stats")
    reward_mode: Literal["sum", "per_reward"] = Field(
        "sum", description="advantages of the weighted reward sum, or per-reward advantages summed"
    )
    clip_range: float = Field(1e-4, gt=0, le=10, description="PPO clip range c of the ratio")
    log_prob_reduction: Literal["sum", "mean"] = Field(
        "mean", description="log-probs summed over latent dims (exact) or averaged (published recipes)"
    )
    kl_beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient beta")
    train_steps: Literal["all", "all_but_last", "first", "random"] = Field(
        "all", description="which stochastic steps are trained"
    )
    step_fraction: float = Field(1.0, gt=0, le=1, description="fraction of steps for first / random")
    inner_epochs: int = Field(1, ge=1, le=100, description="passes over each rollout batch")
    micro_batch_size: int = Field(
        8, ge=1, le=4096, description="samples per denoiser call in rollouts and training (memory)"
    )


def trained_steps(
    stochastic_steps: Sequence[int],
    *,
    mode: str = "all",
    fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Which of the stochastic steps a rollout batch trains on.

    ``all``: every stochastic step. ``all_but_last``: Flow-GRPO (the last step barely moves the image).
    ``random``: a random ``fraction`` of them (DanceGRPO's timestep fraction), drawn from ``generator``.
    ``first``: the first ``fraction`` of them (the high-noise steps, where composition is decided).
    """
    steps = [int(k) for k in stochastic_steps]
    if not steps:
        raise ValueError("the sampler has no stochastic steps: GRPO needs an SDE (sampler.kind=sde)")
    count = max(1, round(fraction * len(steps)))
    if mode == "all":
        return steps
    if mode == "all_but_last":
        return steps[:-1] or steps
    if mode == "first":
        return steps[:count]
    if mode == "random":
        order = torch.randperm(len(steps), generator=generator)[:count]
        return sorted(steps[i] for i in order.tolist())
    raise ValueError(f"unknown step selection {mode!r}: all, all_but_last, first or random")


@register
class GRPO(Algorithm):
    """Step ``s``: P prompts (the same on every process), G samples each, sample ``g`` of the global batch
    drawn from seed (seed, s, g); each process rolls out its contiguous share with the SDE, decodes and
    scores it; rewards are gathered so that every group's statistics use all G samples wherever they
    were drawn; then ``inner_epochs`` passes of the clipped-ratio loss over the trained steps, one
    optimizer step per pass."""

    name = "grpo"
    Settings = GRPOSettings
    reward = "any"

    @classmethod
    def needs_reference(cls, settings: GRPOSettings) -> bool:
        return settings.kl_beta > 0

    def __init__(self, settings: GRPOSettings, context: TrainingContext):
        super().__init__(settings, context)
        sampling = context.sampling
        self.schedule = context.schedule
        self.sampler = sde_sampler(
            context.adapter.kind, sampling.sde_kind, sampling.noise_level, sampling.sde_window
        )
        self.sampler.check(self.schedule)
        self.tracker = (
            PerPromptStatTracker(settings.stats_buffer_size, settings.stats_min_count)
            if settings.per_prompt_stats
            else None
        )
        self.counters = {"nonfinite_groups": 0, "skipped_updates": 0}

    def state_dict(self) -> dict:
        tracker = self.tracker.state_dict() if self.tracker is not None else None
        return {"tracker": tracker, "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.counters.update(state.get("counters", {}))

    def sampler_at(self, step: int) -> Sampler:
        """The sampler of ``step``: a sliding SDE window moves one step later every N training steps."""
        every, window = self.context.sampling.window_shift_every, self.sampler.sde_window
        if not every or window is None:
            return self.sampler
        width = window[1] - window[0]
        positions = self.context.num_steps - width + 1
        start = (window[0] + (step - 1) // every) % positions
        return replace(self.sampler, sde_window=(start, start + width))

    def advantages(
        self, scores: torch.Tensor, dims: dict[str, torch.Tensor], prompts: list[str]
    ) -> Advantages:
        settings = self.settings
        if self.tracker is not None:
            return self.tracker.advantages(prompts, scores, clip=settings.advantage_clip)
        group_ids = torch.arange(len(prompts)) // settings.group_size
        options = dict(
            std=settings.advantage_std,
            clip=settings.advantage_clip,
            drop_zero_std=settings.drop_zero_std_groups,
        )
        if settings.reward_mode == "per_reward":
            return per_reward_advantages(dims, self.context.reward_weights, group_ids, **options)
        return group_advantages(scores, group_ids, **options)

    def step(self, step: int) -> dict[str, float]:
        context, settings, adapter = self.context, self.settings, self.context.adapter
        global_prompts, lo, hi = context.step_prompts(step, settings.prompts_per_step, settings.group_size)
        local_prompts = global_prompts[lo:hi]
        micro = settings.micro_batch_size
        started = time.perf_counter()

        # 1. rollouts (no gradient), decoded and scored
        with torch.no_grad():
            trajectory = context.rollout(
                local_prompts, step, lo, self.sampler_at(step), model_batch_size=micro
            )
            pixels = torch.cat(
                [adapter.decode(trajectory.final[i : i + micro]) for i in range(0, hi - lo, micro)]
            )
            out = context.reward(pixels, local_prompts)
        rollout_seconds = time.perf_counter() - started

        # 2. advantages over the global batch (every process computes the same numbers)
        scores = context.gather(out.score.float())
        dims = {
            name: context.gather(out.dims[name].float())
            for name in context.reward_weights
            if name in out.dims
        }
        advantages = self.advantages(scores, dims, global_prompts)
        if advantages.nonfinite_groups:
            self.counters["nonfinite_groups"] += advantages.nonfinite_groups
            logger.warning(
                "step %d: %d group(s) with a NaN or infinite reward skipped (%d so far)",
                step,
                advantages.nonfinite_groups,
                self.counters["nonfinite_groups"],
            )
        self.last_scores, self.last_advantages = scores, advantages.values  # global; for inspection and tests
        kept = int(advantages.keep.sum())
        finite = scores[torch.isfinite(scores)]
        metrics = {
            "reward/mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward/std": float(finite.std(unbiased=False)) if finite.numel() else float("nan"),
            **{f"reward/{name}": float(value[torch.isfinite(value)].mean()) for name, value in dims.items()},
            "advantage/mean": float(advantages.values[advantages.keep].mean()) if kept else 0.0,
            "advantage/std": float(advantages.values[advantages.keep].std(unbiased=False)) if kept else 0.0,
            "advantage/abs_max": float(advantages.values.abs().max()),
            "zero_std_fraction": advantages.zero_std_groups / advantages.num_groups,
            "nonfinite_groups": advantages.nonfinite_groups,
            "time/rollout_s": rollout_seconds,
        }
        if kept == 0:
            self.counters["skipped_updates"] += 1
            logger.warning("step %d: no group has a reward spread; update skipped", step)
        else:
            metrics.update(self.update(step, trajectory, advantages, lo, hi, len(global_prompts)))
        metrics.update({f"count/{name}": value for name, value in self.counters.items()})
        return metrics

    def update(self, step: int, trajectory, advantages: Advantages, lo: int, hi: int, total: int) -> dict:
        """3. ``inner_epochs`` passes of the clipped-ratio loss over the trained steps of the local samples."""
        context, settings, adapter = self.context, self.settings, self.context.adapter
        stochastic = torch.nonzero(trajectory.stochastic).flatten().tolist()
        generator = torch.Generator().manual_seed(context.sample_seed(step, 2**40))
        steps = trained_steps(
            stochastic, mode=settings.train_steps, fraction=settings.step_fraction, generator=generator
        )
        local_advantages = advantages.values[lo:hi].to(adapter.device)
        local_keep = advantages.keep[lo:hi].to(adapter.device)
        kept = int(advantages.keep.sum())
        micro = settings.micro_batch_size
        per_dim = settings.log_prob_reduction == "mean"
        dims_per_sample = trajectory.latents[0, 0].numel()
        ratios, clipped, kls, grad_norms = [], [], [], []
        started = time.perf_counter()
        with context.train_mode():
            for _ in range(settings.inner_epochs):
                for start in range(0, hi - lo, micro):
                    rows = slice(start, min(start + micro, hi - lo))
                    batch = trajectory.select(rows)
                    for k in steps:
                        if settings.kl_beta:
                            with torch.no_grad(), context.reference():
                                reference_mean = replay_step(adapter, batch, k, model_batch_size=micro).mean
                        policy = replay_step(adapter, batch, k, model_batch_size=micro)
                        log_prob = policy.log_prob_per_dim if per_dim else policy.log_prob
                        old = batch.log_probs[:, k] / dims_per_sample if per_dim else batch.log_probs[:, k]
                        surrogate = clipped_surrogate(
                            log_prob, old, local_advantages[rows], settings.clip_range
                        )
                        loss = (surrogate.loss * local_keep[rows]).sum() / kept
                        if settings.kl_beta:
                            kl = gaussian_kl(policy.mean, reference_mean, policy.std, per_dim=per_dim)
                            loss = loss + settings.kl_beta * kl.sum() / total
                            kls.append(kl.detach())
                        context.backward(loss / len(steps))
                        ratios.append(surrogate.ratio)
                        clipped.append(surrogate.clipped.float())
                grad_norms.append(context.optimizer_step(step))
        ratio = context.gather(torch.cat(ratios))
        return {
            "ratio/mean": float(ratio.mean()),
            "ratio/min": float(ratio.min()),
            "ratio/max": float(ratio.max()),
            "clip_fraction": float(context.gather(torch.cat(clipped)).mean()),
            "kl": float(context.gather(torch.cat(kls)).mean()) if kls else 0.0,
            "grad_norm": grad_norms[-1],
            "time/train_s": time.perf_counter() - started,
            "trained_steps": len(steps),
        }
