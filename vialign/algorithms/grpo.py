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
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from rewards.pairwise import bradley_terry
from vialign.advantages import (
    Advantages,
    PerPromptStatTracker,
    advantage_health,
    group_advantages,
    group_pairs,
    pareto_front,
    per_reward_advantages,
    win_rates,
)
from vialign.algorithms.base import Algorithm, TrainingContext, register
from vialign.errors import VialignInputError
from vialign.losses import clipped_surrogate, gaussian_kl
from vialign.sampling import Sampler, replay_step, sde_sampler
from vialign.schema import StrictModel
from vialign.seeds import mix_seed

logger = logging.getLogger(__name__)


class GRPOSettings(StrictModel):
    """The ``grpo:`` section."""

    group_size: int = Field(
        8,
        ge=1,
        le=1024,
        description="samples per prompt (G); 1 with per_prompt_stats: DDPO's independent prompts",
    )
    prompts_per_step: int = Field(8, ge=1, le=4096, description="prompts per training step (all processes)")
    advantage_std: Literal["group", "global"] = Field("group", description="normalise by group or batch std")
    advantage_clip: float | None = Field(5.0, gt=0, description="clip advantages to +-this (null: off)")
    drop_zero_std_groups: bool = Field(True, description="skip groups whose rewards are all equal")
    per_prompt_stats: bool = Field(False, description="DDPO: z-score against a per-prompt reward buffer")
    stats_buffer_size: int = Field(32, ge=2, description="per_prompt_stats: rewards kept per prompt")
    stats_min_count: int = Field(16, ge=1, description="per_prompt_stats: below this, use batch stats")
    reward_mode: Literal["sum", "per_reward", "pareto"] = Field(
        "sum",
        description="advantages of the weighted reward sum; per-reward advantages summed; or pareto (Parrot): "
        "only the samples no other sample of the batch dominates on every reward train, each with the sum of "
        "its per-reward group advantages, unweighted (the selection needs no weights, and a weighted sum "
        "would let one reward's scale decide again)",
    )
    pareto_advantages: Literal["sum", "min"] = Field(
        "sum",
        description="reward_mode=pareto: a selected sample's advantage is the sum of its per-reward group "
        "advantages (unweighted), or min: the worst of them, so a sample that gains one reward by losing "
        "another is pushed down (vialign's conservative variant, not in the Parrot paper)",
    )
    comparison: Literal["pointwise", "pairwise-winrate"] = Field(
        "pointwise",
        description="pointwise: each sample's reward; pairwise-winrate (Pref-GRPO): each sample's win rate "
        "against the rest of its group, every pair judged by the reward as a pairwise judge",
    )
    pairwise_temperature: float = Field(
        1.0, gt=0, description="pairwise-winrate: P(a > b) = sigmoid((r_a - r_b) / temperature)"
    )
    judge: str | None = Field(
        None,
        description="pairwise-winrate: a pairwise judge by name (rewards.load_pairwise, e.g. vlm-pairwise: a VLM "
        "asked whether the first image is better), every pair of a group judged by it; null: the training "
        "reward read as a Bradley-Terry judge",
    )
    judge_options: dict[str, Any] = Field(
        default_factory=dict, description="options of rewards.load_pairwise(judge, ...)"
    )
    judge_batch_size: int = Field(8, ge=1, le=4096, description="pairs per judge call")
    win_rate: Literal["hard", "soft"] = Field(
        "hard", description="pairwise-winrate: count wins (P > 0.5; ties 0.5, as Pref-GRPO) or sum P"
    )
    health_tolerance: float = Field(
        1e-2,
        ge=0,
        description="health/near_constant_fraction counts groups whose reward std is below this x the batch "
        "scale; a warning when half the groups are (a collapsing or saturated reward)",
    )
    clip_range: float = Field(1e-4, gt=0, le=10, description="PPO clip range c of the ratio")
    log_prob_reduction: Literal["sum", "mean"] = Field(
        "mean", description="log-probs summed over latent dims (exact) or averaged (published recipes)"
    )
    kl_beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient beta")
    train_steps: Literal["all", "all_but_last", "first", "random", "dance"] = Field(
        "all",
        description="which stochastic steps are trained: all, all_but_last, first (a fraction), random (one "
        "random fraction for the batch), dance (DanceGRPO: never the last; a random fraction of the rest per sample)",
    )
    step_fraction: float = Field(1.0, gt=0, le=1, description="fraction of steps for first / random / dance")
    inner_epochs: int = Field(1, ge=1, le=100, description="passes over each rollout batch")
    updates_per_round: int = Field(
        1,
        ge=1,
        le=1024,
        description="optimizer updates per pass: the round's samples are shuffled (the same way on every "
        "process) and split into this many equal minibatches, one update each (DDPO 2, Flow-GRPO 2, DanceGRPO 3)",
    )
    same_group_noise: bool = Field(
        False,
        description="every sample of a group starts from the same initial noise (DanceGRPO init_same_noise)",
    )
    micro_batch_size: int = Field(
        8, ge=1, le=4096, description="samples per denoiser call in rollouts and training (memory)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> GRPOSettings:
        if self.group_size == 1 and not self.per_prompt_stats:
            raise ValueError(
                "group_size=1 leaves every group without a reward spread: use group_size >= 2, or "
                "per_prompt_stats=true (DDPO: advantages against each prompt's reward history)"
            )
        if self.comparison == "pairwise-winrate" and (
            self.per_prompt_stats or self.reward_mode in ("per_reward", "pareto")
        ):
            raise ValueError(
                "comparison=pairwise-winrate makes one win rate per sample from the reward sum: it does not "
                "combine with per_prompt_stats or reward_mode=per_reward / pareto"
            )
        if self.pareto_advantages != "sum" and self.reward_mode != "pareto":
            raise ValueError(
                f"pareto_advantages={self.pareto_advantages} sets how reward_mode=pareto scores the samples it "
                f"selects; this run has reward_mode={self.reward_mode}: set reward_mode=pareto, or drop it"
            )
        if (self.judge is not None or self.judge_options) and self.comparison != "pairwise-winrate":
            raise ValueError(
                "grpo.judge compares the samples of a group in pairs: set grpo.comparison=pairwise-winrate, or "
                "drop grpo.judge to train on the pointwise reward"
            )
        samples = self.group_size * self.prompts_per_step
        if samples % self.updates_per_round:
            raise ValueError(
                f"updates_per_round={self.updates_per_round} does not divide the {samples} samples of a round "
                f"(group_size x prompts_per_step)"
            )
        return self


def trained_steps(
    stochastic_steps: Sequence[int],
    *,
    mode: str = "all",
    fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Which of the stochastic steps a rollout batch (or, for ``dance``, one sample) trains on.

    ``all``: every stochastic step. ``all_but_last``: Flow-GRPO (the last step barely moves the image).
    ``random``: a random ``fraction`` of them (DanceGRPO's timestep fraction), drawn from ``generator``.
    ``first``: the first ``fraction`` of them (the high-noise steps, where composition is decided).
    ``dance``: DanceGRPO's rule (train_grpo_flux.py at 15cc71d): the last step is never trained, then
    ``int(fraction * rest)`` of the rest at random (drawn per sample).
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
    if mode == "dance":
        rest = steps[:-1] or steps
        order = torch.randperm(len(rest), generator=generator)[: max(1, int(fraction * len(rest)))]
        return sorted(rest[i] for i in order.tolist())
    raise ValueError(f"unknown step selection {mode!r}: all, all_but_last, first, random or dance")


def update_minibatches(total: int, updates: int, seed: int) -> list[torch.Tensor]:
    """The global sample indices of each of ``updates`` optimizer updates over a round of ``total``
    samples: one seeded shuffle (the same on every process), cut into equal parts, each sorted."""
    if updates == 1:
        return [torch.arange(total)]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in order.chunk(updates)]


def summarise(values: list[torch.Tensor]) -> torch.Tensor:
    """[sum, count, min, max] of the concatenated ``values`` (float64; empty: 0, 0, inf, -inf)."""
    if not values:
        return torch.tensor([0.0, 0.0, math.inf, -math.inf], dtype=torch.float64)
    flat = torch.cat([v.detach().reshape(-1) for v in values]).double().cpu()
    return torch.stack(
        [flat.sum(), torch.tensor(float(flat.numel()), dtype=torch.float64), flat.min(), flat.max()]
    )


def combine(summaries: torch.Tensor) -> list[dict[str, float]]:
    """Per quantity, the mean, count, min and max over processes of :func:`summarise` rows
    (``summaries``: processes x quantities x 4)."""
    out = []
    for rows in summaries.double().cpu().unbind(1):
        count = float(rows[:, 1].sum())
        out.append(
            {
                "mean": float(rows[:, 0].sum()) / count if count else math.nan,
                "count": count,
                "min": float(rows[:, 2].min()),
                "max": float(rows[:, 3].max()),
            }
        )
    return out


# mix_seed(seed, step, stream, ...) streams of per-step draws that are not samples' noise
MINIBATCH_STREAM, DANCE_STEPS_STREAM = 2, 3


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
        self.judge = None
        if settings.judge is not None and context.num_frames is not None:
            raise VialignInputError(
                f"grpo.judge compares pairs of images; {context.adapter.family} generates videos: drop "
                "grpo.judge (comparison: pairwise-winrate then reads the training reward as the judge)"
            )
        if settings.judge is not None:
            import rewards

            judge = rewards.load_pairwise(settings.judge, **settings.judge_options)
            self.judge = rewards.require_pairwise(judge, "grpo.judge").to(context.adapter.device).eval()
        if settings.reward_mode == "pareto" and len(context.reward_weights) < 2:
            raise VialignInputError(
                f"grpo.reward_mode=pareto selects samples no other beats on every reward, which needs two or "
                f"more rewards; got {list(context.reward_weights)}: add a reward, or use reward_mode=sum"
            )

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
        self,
        scores: torch.Tensor,
        dims: dict[str, torch.Tensor],
        prompts: list[str],
        judged: torch.Tensor | None = None,
    ) -> Advantages:
        """Advantages of the global batch; ``judged``: win rates a pairwise judge already made."""
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
        if settings.reward_mode == "pareto":
            unweighted = dict.fromkeys(self.context.reward_weights, 1.0)
            advantages = per_reward_advantages(
                dims, unweighted, group_ids, combine=settings.pareto_advantages, **options
            )
            return self.pareto_selected(advantages, dims)
        if judged is not None:
            scores = judged
        elif settings.comparison == "pairwise-winrate":
            scores = self.win_rates(scores, group_ids)
        return group_advantages(scores, group_ids, **options)

    def pareto_selected(self, advantages: Advantages, dims: dict[str, torch.Tensor]) -> Advantages:
        """Parrot's batch-wise selection (Lee et al. 2024, Sec. 4.2): only the non-dominated samples of
        the global batch train; a sample with a non-finite reward neither trains nor dominates. (Fewer than
        two rewards is refused when the algorithm is set up.)"""
        names = list(self.context.reward_weights)
        table = torch.stack([dims[name] for name in names], dim=1)
        finite = torch.isfinite(table).all(1)
        front = torch.zeros_like(finite)
        front[finite] = pareto_front(table[finite])
        keep = advantages.keep & front
        values = torch.where(keep, advantages.values, torch.zeros_like(advantages.values))
        return replace(advantages, values=values, keep=keep)

    def win_rates(self, scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """Pref-GRPO's rewards: every pair of a group judged once by the training reward read as a pairwise
        judge (:class:`rewards.PointwiseAsPairwise`: one reward call per sample, not per pair)."""
        pairs = group_pairs(group_ids)
        probability = bradley_terry(
            scores[pairs[:, 0]], scores[pairs[:, 1]], self.settings.pairwise_temperature
        )
        return win_rates(probability, pairs, group_ids, hard=self.settings.win_rate == "hard")

    def judged_win_rates(self, pixels: torch.Tensor, prompts: list[str], lo: int) -> torch.Tensor:
        """Pref-GRPO with a pairwise judge: every unordered pair of each local group judged once, in batches
        of ``judge_batch_size`` pairs; each sample's win rate in its group (this process's samples)."""
        settings = self.settings
        group_ids = (torch.arange(len(prompts)) + lo) // settings.group_size
        pairs = group_pairs(group_ids)
        judgements = []
        with torch.no_grad():
            for start in range(0, len(pairs), settings.judge_batch_size):
                a, b = pairs[start : start + settings.judge_batch_size].unbind(1)
                judgements.append(self.judge(pixels[a], pixels[b], [prompts[i] for i in a.tolist()]).cpu())
        probability = torch.cat(judgements) if judgements else torch.zeros(0)
        return win_rates(probability, pairs, group_ids, hard=settings.win_rate == "hard")

    def step(self, step: int) -> dict[str, float]:
        context, settings, adapter = self.context, self.settings, self.context.adapter
        global_prompts, lo, hi = context.step_prompts(step, settings.prompts_per_step, settings.group_size)
        if self.judge is not None and (lo % settings.group_size or hi % settings.group_size):
            raise VialignInputError(
                f"grpo.judge compares the images of a group, so each process must hold whole groups: make the "
                f"{len(global_prompts)} samples of a step (prompts_per_step x group_size) a multiple of "
                f"group_size ({settings.group_size}) x the number of processes"
            )
        local_prompts = global_prompts[lo:hi]
        micro = settings.micro_batch_size
        started = time.perf_counter()

        # 1. rollouts (no gradient), decoded and scored
        with torch.no_grad():
            trajectory = context.rollout(
                local_prompts,
                step,
                lo,
                self.sampler_at(step),
                model_batch_size=micro,
                shared_noise_group=settings.group_size if settings.same_group_noise else 1,
            )
            pixels = torch.cat(
                [adapter.decode(trajectory.final[i : i + micro]) for i in range(0, hi - lo, micro)]
            )
            out = context.reward(pixels, local_prompts)
            judged = None
            if self.judge is not None:
                judged = context.gather(
                    self.judged_win_rates(pixels, local_prompts, lo).to(adapter.device)
                ).cpu()
        rollout_seconds = time.perf_counter() - started

        # 2. advantages over the global batch (every process computes the same numbers)
        # the global batch's rewards on the CPU: a few numbers per sample, and the group bookkeeping
        # (group ids, pairs, Pareto fronts) is CPU tensors
        scores = context.gather(out.score.float()).cpu()
        dims = {
            name: context.gather(out.dims[name].float()).cpu()
            for name in context.reward_weights
            if name in out.dims
        }
        advantages = self.advantages(scores, dims, global_prompts, judged)
        if advantages.nonfinite_groups:
            self.counters["nonfinite_groups"] += advantages.nonfinite_groups
            logger.warning(
                "step %d: %d group(s) with a NaN or infinite reward skipped (%d so far)",
                step,
                advantages.nonfinite_groups,
                self.counters["nonfinite_groups"],
            )
        self.last_scores, self.last_advantages = scores, advantages.values  # global; for inspection and tests
        health = advantage_health(
            scores, torch.arange(len(scores)) // settings.group_size, tolerance=settings.health_tolerance
        )
        if health.collapsed:
            logger.warning(
                "step %d: %.0f%% of groups have near-identical rewards (std <= %g x the batch scale): their "
                "normalised advantages are noise; the reward may be saturated or hacked",
                step,
                100 * health.near_constant_fraction,
                settings.health_tolerance,
            )
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
            **health.metrics(),
        }
        if kept == 0:
            self.counters["skipped_updates"] += 1
            if advantages.nonfinite_groups == advantages.num_groups:  # say why, not "no spread"
                logger.warning("step %d: every group had a NaN or infinite reward; update skipped", step)
            else:
                logger.warning("step %d: no group has a reward spread; update skipped", step)
        else:
            metrics.update(self.update(step, trajectory, advantages, lo, hi, len(global_prompts)))
        metrics.update({f"count/{name}": value for name, value in self.counters.items()})
        return metrics

    def steps_to_train(self, step: int, stochastic: list[int], lo: int, hi: int) -> list[list[int]]:
        """The trained steps of each local sample: one choice for the batch, or (``dance``) one per
        sample, drawn from (seed, step, global index) so that processes agree."""
        settings, context = self.settings, self.context
        if settings.train_steps == "dance":
            return [
                trained_steps(
                    stochastic,
                    mode="dance",
                    fraction=settings.step_fraction,
                    generator=torch.Generator().manual_seed(
                        mix_seed(context.seed, step, DANCE_STEPS_STREAM, g)
                    ),
                )
                for g in range(lo, hi)
            ]
        generator = torch.Generator().manual_seed(context.sample_seed(step, 2**40))
        steps = trained_steps(
            stochastic, mode=settings.train_steps, fraction=settings.step_fraction, generator=generator
        )
        return [steps] * (hi - lo)

    def update(self, step: int, trajectory, advantages: Advantages, lo: int, hi: int, total: int) -> dict:
        """3. ``inner_epochs`` passes of the clipped-ratio loss over the trained steps of the local samples,
        each pass ``updates_per_round`` optimizer updates on disjoint minibatches of the global batch."""
        context, settings, adapter = self.context, self.settings, self.context.adapter
        stochastic = torch.nonzero(trajectory.stochastic).flatten().tolist()
        steps_of = self.steps_to_train(step, stochastic, lo, hi)
        per_sample = len(steps_of[0])  # the same count for every sample
        local_advantages = advantages.values[lo:hi].to(adapter.device)
        local_keep = advantages.keep[lo:hi].to(adapter.device)
        micro = settings.micro_batch_size
        per_dim = settings.log_prob_reduction == "mean"
        dims_per_sample = trajectory.latents[0, 0].numel()
        ratios, clipped, kls, grad_norms, first_ratios = [], [], [], [], []
        self.last_update_ratios = []  # this process's ratios of each optimizer update (for inspection)
        started = time.perf_counter()
        with context.train_mode():
            for epoch in range(settings.inner_epochs):
                seed = mix_seed(context.seed, step, MINIBATCH_STREAM, epoch)
                for minibatch in update_minibatches(total, settings.updates_per_round, seed):
                    kept = int(advantages.keep[minibatch].sum())
                    if kept == 0:  # every process knows: all skip this update alike
                        continue
                    local = [int(i) - lo for i in minibatch if lo <= int(i) < hi]
                    update_ratios = []
                    for start in range(0, len(local), micro):
                        rows = local[start : start + micro]
                        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
                        batch = trajectory.select(slice(rows[0], rows[0] + len(rows)) if contiguous else rows)
                        for k in sorted({k for r in rows for k in steps_of[r]}):
                            members = [j for j, r in enumerate(rows) if k in steps_of[r]]
                            part = batch if len(members) == len(rows) else batch.select(members)
                            chosen = [rows[j] for j in members]
                            if settings.kl_beta:
                                with torch.no_grad(), context.reference():
                                    reference_mean = replay_step(
                                        adapter, part, k, model_batch_size=micro
                                    ).mean
                            policy = replay_step(adapter, part, k, model_batch_size=micro)
                            log_prob = policy.log_prob_per_dim if per_dim else policy.log_prob
                            old = part.log_probs[:, k] / dims_per_sample if per_dim else part.log_probs[:, k]
                            surrogate = clipped_surrogate(
                                log_prob, old, local_advantages[chosen], settings.clip_range
                            )
                            loss = (surrogate.loss * local_keep[chosen]).sum() / kept
                            if settings.kl_beta:
                                kl = gaussian_kl(policy.mean, reference_mean, policy.std, per_dim=per_dim)
                                loss = loss + settings.kl_beta * kl.sum() / len(minibatch)
                                kls.append(kl.detach())
                            context.backward(loss / per_sample)
                            update_ratios.append(surrogate.ratio)
                            clipped.append(surrogate.clipped.float())
                    ratios.extend(update_ratios)
                    self.last_update_ratios.append(
                        torch.cat(update_ratios).detach() if update_ratios else None
                    )
                    if not grad_norms:
                        first_ratios = list(update_ratios)
                    grad_norms.append(context.optimizer_step(step))
        # processes may hold different numbers of samples of a minibatch: gather summaries, not values
        parts = [ratios, clipped, kls, [(r - 1).abs() for r in first_ratios]]
        local = torch.stack([summarise(values) for values in parts]).to(adapter.device)
        ratio, clip, kl, first = combine(context.gather(local[None]))
        return {
            "ratio/mean": ratio["mean"],
            "ratio/min": ratio["min"],
            "ratio/max": ratio["max"],
            "ratio/first_update_max_deviation": first["max"] if first["count"] else 0.0,
            "clip_fraction": clip["mean"],
            "kl": kl["mean"] if kl["count"] else 0.0,
            "grad_norm": grad_norms[-1] if grad_norms else 0.0,
            "optimizer_updates": len(grad_norms),
            "time/train_s": time.perf_counter() - started,
            "trained_steps": per_sample,
        }
