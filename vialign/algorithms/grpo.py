"""GRPO for diffusion and flow models (DanceGRPO, Flow-GRPO; DDPO is the DDIM-eta ancestor).

The math of DESIGN.md section 5, as pure functions on tensors; the trainer (``vialign.trainer``)
owns rollouts, rewards, processes and optimisers.

For G samples of one prompt with rewards r_1 .. r_G (group = the samples of one prompt, over all
processes)::

    A_i = (r_i - mean_group(r)) / (std + 1e-4)          std: the group's, or the whole batch's
    A_i <- clip(A_i, -A_max, A_max)                     groups with zero std carry no signal: dropped

For every trained step k of sample i, with the stored (rollout) log-prob logp_old::

    ratio = exp(logp_theta(x_{k+1} | x_k) - logp_old)
    L     = -min(ratio A, clip(ratio, 1 - c, 1 + c) A) + beta KL(p_theta || p_ref)
    KL    = |mu_theta - mu_ref|^2 / (2 std^2)           (both steps share the std of the schedule)

averaged over samples and trained steps. Multi-reward: advantages of the weighted sum, or per-reward
advantages weighted and summed (``per_reward_advantages``). DDPO's per-prompt running statistics
(Black et al. 2023, ``PerPromptStatTracker``) replace the group statistics by those of a buffer of the
prompt's recent rewards.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

STD_EPS = 1e-4


@dataclass
class Advantages:
    values: torch.Tensor  # [B] float32, 0 where dropped
    keep: torch.Tensor  # [B] bool: samples that train (finite rewards, groups with signal)
    zero_std_groups: int  # groups dropped for having no spread
    nonfinite_groups: int  # groups dropped for a NaN / infinite reward
    num_groups: int


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: str = "group",
    clip: float | None = 5.0,
    drop_zero_std: bool = True,
) -> Advantages:
    """Group-normalised advantages of ``rewards`` [B]; ``group_ids`` [B] says which prompt each belongs to.

    ``std="group"`` divides by each group's std (DanceGRPO, Flow-GRPO), ``"global"`` by the std of all
    kept rewards (Dr. GRPO-style; steadier when groups are small). A group with a non-finite reward is
    dropped whole: its mean would be meaningless. Std is the population std (``unbiased=False``), as the
    published code uses ``np.std``.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    rewards = rewards.float()
    groups = torch.unique(group_ids)
    keep = torch.ones_like(rewards, dtype=torch.bool)
    centred = torch.zeros_like(rewards)
    group_std = torch.ones_like(rewards)
    zero_std = nonfinite = 0
    for g in groups:
        members = group_ids == g
        r = rewards[members]
        if not torch.isfinite(r).all():
            keep[members], nonfinite = False, nonfinite + 1
            continue
        spread = r.std(unbiased=False)
        if drop_zero_std and spread == 0:
            keep[members], zero_std = False, zero_std + 1
            continue
        centred[members] = r - r.mean()
        group_std[members] = spread
    if std == "global":
        kept = rewards[keep]
        scale = kept.std(unbiased=False) if kept.numel() > 1 else torch.tensor(0.0)
        values = centred / (scale + STD_EPS)
    else:
        values = centred / (group_std + STD_EPS)
    if clip is not None:
        values = values.clamp(-clip, clip)
    values = torch.where(keep, values, torch.zeros_like(values))
    return Advantages(values, keep, zero_std, nonfinite, len(groups))


def per_reward_advantages(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: torch.Tensor,
    **options,
) -> Advantages:
    """Each reward normalised within its groups on its own, then ``sum_j w_j A_j`` (so a reward with a
    large scale cannot drown the others). A sample is kept when every reward keeps it."""
    parts = {name: group_advantages(scores[name], group_ids, **options) for name in weights}
    keep = torch.stack([p.keep for p in parts.values()]).all(0)
    values = sum(weights[name] * part.values for name, part in parts.items())
    values = torch.where(keep, values, torch.zeros_like(values))
    first = next(iter(parts.values()))
    return Advantages(
        values,
        keep,
        max(p.zero_std_groups for p in parts.values()),
        max(p.nonfinite_groups for p in parts.values()),
        first.num_groups,
    )


class PerPromptStatTracker:
    """DDPO's per-prompt running statistics: the advantage of a reward is its z-score against the last
    ``buffer_size`` rewards seen for the same prompt; until ``min_count`` have been seen, against the
    whole batch. State is plain lists, saved in checkpoints as JSON."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def advantages(
        self, prompts: Sequence[str], rewards: torch.Tensor, *, clip: float | None = 5.0
    ) -> Advantages:
        rewards = rewards.float()
        finite = torch.isfinite(rewards)
        batch = rewards[finite]
        values = torch.zeros_like(rewards)
        for prompt in dict.fromkeys(prompts):
            members = torch.tensor([p == prompt for p in prompts]) & finite
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[members].tolist())
            reference = torch.tensor(list(buffer)) if len(buffer) >= self.min_count else batch
            mean, std = reference.mean(), reference.std(unbiased=False)
            values[members] = (rewards[members] - mean) / (std + STD_EPS)
        if clip is not None:
            values = values.clamp(-clip, clip)
        values = torch.where(finite, values, torch.zeros_like(values))
        nonfinite_prompts = len({p for p, f in zip(prompts, finite.tolist()) if not f})
        return Advantages(values, finite, 0, nonfinite_prompts, len(set(prompts)))

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(b, maxlen=self.buffer_size) for p, b in state["buffers"].items()}


@dataclass
class SurrogateOutput:
    loss: torch.Tensor  # [B] -min(ratio A, clip(ratio) A)
    ratio: torch.Tensor  # [B]
    clipped: torch.Tensor  # [B] bool: the clipped branch was taken (its gradient is zero)


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> SurrogateOutput:
    """PPO's clipped surrogate per sample (Schulman et al. 2017, eq. 7), negated to a loss."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return SurrogateOutput(torch.maximum(unclipped, clipped), ratio.detach(), (clipped > unclipped).detach())


def gaussian_kl(
    mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float, *, per_dim: bool = False
) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) = |mean - ref_mean|^2 / (2 std^2), per sample [B];
    ``per_dim`` divides by the number of dimensions (matching mean-reduced log-probs)."""
    std = torch.as_tensor(std, device=mean.device, dtype=torch.float32)
    if std.ndim == 1:
        std = std.view(-1, *[1] * (mean.ndim - 1))
    kl = ((mean.float() - ref_mean.float()) ** 2 / (2 * std**2)).flatten(1).sum(1)
    return kl / mean[0].numel() if per_dim else kl


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


# ---------------------------------------------------------------------------------------------------
# The training step: rollouts -> rewards -> advantages over all processes -> clipped-ratio updates.


class GRPO:
    """One GRPO training step at a time on a :class:`vialign.trainer.Trainer` (DanceGRPO, Flow-GRPO, DDPO).

    Step ``s``: P prompts (the same on every process), G samples each, sample ``g`` of the global batch
    drawn from seed (seed, s, g); each process rolls out its contiguous share with the SDE, decodes and
    scores it; rewards are gathered so that every group's statistics use all G samples wherever they
    were drawn; then ``inner_epochs`` passes of the clipped-ratio loss over the trained steps, one
    optimizer step per pass, the gradient averaged over processes.
    """

    def __init__(self, config, trainer):
        self.config, self.trainer = config, trainer
        self.settings = config.grpo
        adapter = trainer.adapter
        sampler_config = config.sampler
        self.num_steps = sampler_config.num_steps or adapter.default_num_steps
        self.height, self.width = trainer.image_size()
        self.schedule = adapter.schedule(self.num_steps, self.height, self.width)
        self.guidance = adapter.make_guidance(sampler_config.guidance_scale)
        from vialign.sampling import Sampler

        self.sampler = Sampler(
            sde=sampler_config.sde_kind or ("ddim" if adapter.kind == "diffusion" else "flow-sde"),
            noise_level=sampler_config.noise_level,
            sde_window=sampler_config.sde_window,
        )
        self.sampler.check(self.schedule)
        self.tracker = (
            PerPromptStatTracker(self.settings.stats_buffer_size, self.settings.stats_min_count)
            if self.settings.per_prompt_stats
            else None
        )

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict() if self.tracker is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])

    def sampler_at(self, step: int):
        """The sampler of ``step``: a sliding SDE window moves one step later every N training steps."""
        from dataclasses import replace

        every, window = self.config.sampler.window_shift_every, self.sampler.sde_window
        if not every or window is None:
            return self.sampler
        width = window[1] - window[0]
        positions = self.num_steps - width + 1
        start = (window[0] + (step - 1) // every) % positions
        return replace(self.sampler, sde_window=(start, start + width))

    def _advantages(
        self, scores: torch.Tensor, dims: dict[str, torch.Tensor], prompts: list[str]
    ) -> Advantages:
        settings = self.settings
        group_ids = torch.arange(len(prompts)) // settings.group_size
        options = dict(
            std=settings.advantage_std,
            clip=settings.advantage_clip,
            drop_zero_std=settings.drop_zero_std_groups,
        )
        if self.tracker is not None:
            return self.tracker.advantages(prompts, scores, clip=settings.advantage_clip)
        if settings.reward_mode == "per_reward":
            weights = {name: spec.weight for name, spec in self.config.rewards.items()}
            return per_reward_advantages(dims, weights, group_ids, **options)
        return group_advantages(scores, group_ids, **options)

    def step(self, step: int) -> dict[str, float]:
        from vialign.data import prompts_for_step
        from vialign.sampling import evaluate_step, rollout_prompts
        from vialign.trainer import sample_seed

        trainer, settings, adapter = self.trainer, self.settings, self.trainer.adapter
        seed, group = self.config.seed, settings.group_size
        prompts = prompts_for_step(trainer.train_prompts, step, settings.prompts_per_step, seed)
        global_prompts = [p for p in prompts for _ in range(group)]
        lo, hi = trainer.local_range(len(global_prompts))
        local_prompts = global_prompts[lo:hi]
        micro = settings.micro_batch_size
        sampler = self.sampler_at(step)
        started = time.perf_counter()

        # 1. rollouts (no gradient), decoded and scored
        adapter.unwrapped_denoiser.eval()
        with torch.no_grad():
            # every process encodes the step's prompts in the same batches (text encoders' outputs move in
            # the last bits with the batch), so a sample's embedding does not depend on its process
            adapter.encode_prompt(prompts)
            trajectory = rollout_prompts(
                adapter,
                local_prompts,
                [sample_seed(seed, step, g) for g in range(lo, hi)],
                self.schedule,
                height=self.height,
                width=self.width,
                guidance=self.guidance,
                sampler=sampler,
                model_batch_size=micro,
            )
            pixels = torch.cat(
                [adapter.decode(trajectory.final[i : i + micro]) for i in range(0, hi - lo, micro)]
            )
            out = trainer.reward(pixels, local_prompts)
        if out.score.shape != (hi - lo,):
            raise ValueError(
                f"the reward returned scores of shape {tuple(out.score.shape)} for {hi - lo} images; "
                "a reward must return one score per image"
            )
        rollout_seconds = time.perf_counter() - started

        # 2. advantages over the global batch (every process computes the same numbers)
        scores = trainer.gather(out.score.float())
        dims = {
            name: trainer.gather(out.dims[name].float()) for name in self.config.rewards if name in out.dims
        }
        advantages = self._advantages(scores, dims, global_prompts)
        if advantages.nonfinite_groups:
            trainer.counters["nonfinite_groups"] += advantages.nonfinite_groups
            logger.warning(
                "step %d: %d group(s) with a NaN or infinite reward skipped (%d so far)",
                step,
                advantages.nonfinite_groups,
                trainer.counters["nonfinite_groups"],
            )
        self.last_scores, self.last_advantages = scores, advantages.values  # global; for inspection and tests
        local_advantages = advantages.values[lo:hi].to(adapter.device)
        local_keep = advantages.keep[lo:hi].to(adapter.device)
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
            trainer.counters["skipped_updates"] += 1
            logger.warning("step %d: no group has a reward spread; update skipped", step)
            return metrics

        # 3. clipped-ratio updates on the trained steps
        stochastic = torch.nonzero(trajectory.stochastic).flatten().tolist()
        generator = torch.Generator().manual_seed(sample_seed(seed, step, 2**40))
        steps = trained_steps(
            stochastic, mode=settings.train_steps, fraction=settings.step_fraction, generator=generator
        )
        per_dim = settings.log_prob_reduction == "mean"
        dims_per_sample = trajectory.latents[0, 0].numel()
        total = len(global_prompts)
        ratios, clipped, kls, grad_norms = [], [], [], []
        started = time.perf_counter()
        adapter.unwrapped_denoiser.train()
        for _ in range(settings.inner_epochs):
            calls = [(start, k) for start in range(0, hi - lo, micro) for k in steps]
            for index, (start, k) in enumerate(calls):
                rows = slice(start, min(start + micro, hi - lo))
                batch = trajectory.select(rows)
                common = dict(
                    guidance=batch.guidance,
                    uncond=batch.uncond,
                    stochastic=True,
                    prev=batch.latents[:, k + 1],
                    model_batch_size=micro,
                )
                if settings.kl_beta:
                    with torch.no_grad(), trainer.reference():
                        reference_mean = evaluate_step(
                            adapter, self.schedule, sampler, k, batch.latents[:, k], batch.cond, **common
                        ).mean
                with trainer.no_sync(sync=index == len(calls) - 1):
                    with trainer.policy():
                        step_out = evaluate_step(
                            adapter, self.schedule, sampler, k, batch.latents[:, k], batch.cond, **common
                        )
                    log_prob = step_out.log_prob_per_dim if per_dim else step_out.log_prob
                    old = batch.log_probs[:, k] / dims_per_sample if per_dim else batch.log_probs[:, k]
                    surrogate = clipped_surrogate(log_prob, old, local_advantages[rows], settings.clip_range)
                    loss = (surrogate.loss * local_keep[rows]).sum() / kept
                    if settings.kl_beta:
                        kl = gaussian_kl(step_out.mean, reference_mean, step_out.std, per_dim=per_dim)
                        loss = loss + settings.kl_beta * kl.sum() / total
                        kls.append(kl.detach())
                    # DDP averages gradients over processes; the loss above is already a global mean
                    (loss * trainer.world_size / len(steps)).backward()
                ratios.append(surrogate.ratio)
                clipped.append(surrogate.clipped.float())
            grad_norms.append(trainer.optimizer_step(step))
        adapter.unwrapped_denoiser.eval()
        ratio = trainer.gather(torch.cat(ratios))
        metrics.update(
            {
                "ratio/mean": float(ratio.mean()),
                "ratio/min": float(ratio.min()),
                "ratio/max": float(ratio.max()),
                "clip_fraction": float(trainer.gather(torch.cat(clipped)).mean()),
                "kl": float(trainer.gather(torch.cat(kls)).mean()) if kls else 0.0,
                "grad_norm": grad_norms[-1],
                "time/train_s": time.perf_counter() - started,
                "trained_steps": len(steps),
            }
        )
        return metrics
