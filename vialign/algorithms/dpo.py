"""Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908) and Flow-DPO, offline from preference pairs
and online from the policy's own samples ranked by a reward (docs/algorithms.md, "DPO").

A step: P pairs (x0_w, x0_l) with their prompt; each pair draws ONE noise eps and ONE timestep t, shared
by winner and loser; ``x_t = alpha_t x0 + sigma_t eps``; the per-sample error of the denoiser against its
target (``vialign.losses.denoising_target``: eps, v, or the flow velocity eps - x0)::

    e_w = mean |f_theta(x_t^w, t, c) - target_w|^2        e_l likewise, e_w_ref / e_l_ref under the reference
    L   = -log sigmoid(-beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref)))        (eq. 14; vialign.losses.dpo_loss)

t ~ U{0, ..., T-1} for diffusion models (as Diffusion-DPO's train.py); for flow models t = T * sigmoid(u),
u ~ N(logit_mean, logit_std^2) (the logit-normal of SD3's training, as flow_grpo's DPO script). The
reference is the policy with its LoRA disabled (or a frozen copy for full fine-tuning).

``dpo`` reads pairs from ``data.train`` (``vialign.preferences``), encoded once by the VAE.
``online_dpo`` samples ``samples_per_prompt`` images of each prompt with the current policy (or, as
flow_grpo's DPO trainer, with the reference: ``rollout_model``; ODE or an SDE: ``noise_level``), scores
them with the reward and pairs the best with the worst (their final latents, no re-encode); the reference
stays the initial model unless ``reference_update_every`` copies the policy into it. ``shift_timesteps``
and ``draws_per_pair`` are flow_grpo's shifted logit-normal t and its 39 (noise, t) draws per pair.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
from pydantic import Field

from pipelines.adapter import Guidance
from vialign.algorithms.base import PROMPT_DROPOUT_STREAM, Algorithm, TrainingContext, drop_prompts, register
from vialign.data import prompts_for_step
from vialign.errors import VialignInputError
from vialign.losses import denoising_target, dpo_loss
from vialign.sampling import Sampler, sde_sampler
from vialign.schema import StrictModel
from vialign.seeds import mix_seed

logger = logging.getLogger(__name__)


class DPOSettings(StrictModel):
    """The ``dpo:`` section."""

    beta: float = Field(
        ...,
        gt=0,
        description="KL strength; published: 5000 (SD 1.5 / SDXL), 100 (SD3.5-M LoRA), ~2000 (FLUX)",
    )
    pairs_per_step: int = Field(
        8, ge=1, le=65536, description="preference pairs per training step (all processes)"
    )
    micro_batch_size: int = Field(4, ge=1, le=4096, description="pairs per denoiser call (memory)")
    logit_mean: float = Field(0.0, description="flow models: mean of the logit-normal t")
    logit_std: float = Field(1.0, gt=0, description="flow models: std of the logit-normal t")
    shift_timesteps: bool = Field(
        False,
        description="flow models: pass the logit-normal t through the scheduler's static shift "
        "(sigma = s t / (1 + (s - 1) t)), as flow_grpo's DPO trainer draws from the shifted sigmas",
    )
    draws_per_pair: int = Field(
        1,
        ge=1,
        le=1000,
        description="(noise, t) draws per pair in one update, the loss averaged over them "
        "(flow_grpo: int(40 x 0.99) = 39)",
    )


class OnlineDPOSettings(DPOSettings):
    """The ``online_dpo:`` section."""

    samples_per_prompt: int = Field(4, ge=2, le=1024, description="policy samples per prompt; best vs worst")
    pairs_per_step: int = Field(8, ge=1, le=4096, description="prompts (one pair each) per training step")
    rollout_model: Literal["policy", "reference"] = Field(
        "policy",
        description="whose samples make the pairs: the policy's, or the reference's (flow_grpo's DPO samples "
        "from its reference adapter)",
    )
    noise_level: float = Field(
        0.0,
        ge=0,
        le=10,
        description="0: ODE samples; > 0: the model kind's SDE at this level (flow_grpo: 0.7)",
    )
    reference_update_every: int | None = Field(
        None,
        ge=1,
        description="copy the policy into the reference every N training steps (flow_grpo's OnlineDPO: 40); "
        "null: the reference stays the initial model",
    )


def dpo_timesteps(adapter, count: int, settings: DPOSettings, generator: torch.Generator) -> torch.Tensor:
    """One training timestep per pair, in the adapter's schedule units."""
    total = adapter.scheduler.config.num_train_timesteps
    if adapter.kind == "flow":
        u = torch.randn(count, generator=generator) * settings.logit_std + settings.logit_mean
        sigma = torch.sigmoid(u)
        if settings.shift_timesteps:
            if adapter.scheduler.config.get("use_dynamic_shifting", False):
                raise VialignInputError(
                    "shift_timesteps uses the scheduler's static shift, but this model shifts by resolution: "
                    "set model.scheduler.shift (e.g. 3.0) or shift_timesteps: false"
                )
            shift = float(adapter.scheduler.config.get("shift", 1.0))
            sigma = shift * sigma / (1 + (shift - 1) * sigma)
        return sigma * total
    return torch.randint(total, (count,), generator=generator).float()


def pair_errors(
    adapter,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond,
    guidance: Guidance = Guidance(),
    uncond=None,
) -> torch.Tensor:
    """Per-sample mean squared error of the denoiser against its target at ``alpha_t x0 + sigma_t noise``:
    the conditional prediction (DPO; FLUX-dev's guidance embedding if ``guidance`` has one), or the
    CFG-guided one when ``guidance`` has a CFG scale and ``uncond`` is given."""
    alpha, sigma = adapter.coefficients(t.to(adapter.device))
    shape = (-1,) + (1,) * (x0.ndim - 1)  # B x C x h x w images, B x C x F x h x w videos
    alpha, sigma = alpha.view(shape).float(), sigma.view(shape).float()
    output = adapter.predict(alpha * x0 + sigma * noise, t, cond, guidance, uncond)
    target = denoising_target(adapter.prediction_type, x0.float(), noise.float(), alpha, sigma)
    return (output.float() - target).square().flatten(1).mean(1)


class _PreferenceStep:
    """The DPO update on a global batch of pairs, shared by the offline and online algorithms."""

    settings: DPOSettings
    context: TrainingContext

    def dpo_update(
        self, step: int, prompts: list[str], chosen: torch.Tensor, rejected: torch.Tensor, count: int, lo: int
    ) -> dict[str, float]:
        """Accumulate this process's share of the mean DPO loss over ``count`` pairs (all processes) and
        take the optimizer step. ``prompts``/``chosen``/``rejected`` are this process's pairs, global
        indices ``lo, lo + 1, ...``; each pair's noise and t come from the (seed, step) generator, so a
        pair draws the same ones whichever process holds it."""
        context, settings = self.context, self.settings
        adapter = context.adapter
        generator = torch.Generator().manual_seed(context.sample_seed(step, 2**43))
        guidance = Guidance(embedded=context.guidance.embedded)  # the conditional prediction, as trained
        totals = torch.zeros(5, device=adapter.device)  # loss, accuracy, model_diff, ref_diff, pairs
        draws = settings.draws_per_pair
        for _ in range(draws):
            # every pair's noise and t, for the whole global batch (the same on every process)
            t_all = dpo_timesteps(adapter, count, settings, generator)
            noise_all = torch.randn((count, *chosen.shape[1:]), generator=generator)
            totals += self._accumulate(
                prompts, chosen, rejected, t_all, noise_all, lo, count * draws, guidance
            )
        grad_norm = context.optimizer_step(step)
        totals = context.reduce(totals)
        pairs = totals[4]
        return {
            "loss": float(totals[0] / pairs),
            "implicit_accuracy": float(totals[1] / pairs),
            "mse_gap/policy": float(totals[2] / pairs),  # mean e_w - e_l
            "mse_gap/reference": float(totals[3] / pairs),
            "grad_norm": grad_norm,
        }

    def _accumulate(
        self, prompts, chosen, rejected, t_all, noise_all, lo: int, total: int, guidance
    ) -> torch.Tensor:
        """Backward of this process's pairs' DPO losses at one (noise, t) draw, each divided by ``total``;
        returns the summed loss, accuracy, model and reference gaps and the pair count."""
        context, settings, adapter = self.context, self.settings, self.context.adapter
        totals = torch.zeros(5, device=adapter.device)
        for start in range(0, len(prompts), settings.micro_batch_size):
            end = min(start + settings.micro_batch_size, len(prompts))
            n = end - start
            x0 = torch.cat([chosen[start:end], rejected[start:end]]).to(adapter.device)
            pair_noise = noise_all[lo + start : lo + end]
            noise = torch.cat([pair_noise, pair_noise]).to(adapter.device)  # shared by w and l
            t = t_all[lo + start : lo + end].repeat(2)
            cond = adapter.encode_prompt(prompts[start:end] * 2)
            with torch.no_grad(), context.reference():
                ref = pair_errors(adapter, x0, noise, t, cond, guidance)
            with context.train_mode():
                errors = pair_errors(adapter, x0, noise, t, cond, guidance)
            out = dpo_loss(errors[:n], errors[n:], ref[:n], ref[n:], settings.beta)
            context.backward(out.loss.sum() / total)
            totals += torch.stack(
                [
                    out.loss.detach().sum(),
                    out.implicit_accuracy.sum(),
                    out.model_diff.sum(),
                    out.ref_diff.sum(),
                    torch.tensor(float(n), device=totals.device),
                ]
            )
        return totals


@register
class DPO(_PreferenceStep, Algorithm):
    """Offline Diffusion-/Flow-DPO on the pairs of ``data.train`` (``context.preferences``)."""

    name = "dpo"
    Settings = DPOSettings
    reward = "none"
    data = "preference_pairs"

    @classmethod
    def needs_reference(cls, settings: DPOSettings) -> bool:
        return True

    def __init__(self, settings: DPOSettings, context: TrainingContext):
        super().__init__(settings, context)
        if context.preferences is None:
            raise ValueError("algorithm=dpo needs the trainer to load preference pairs")
        self.latents = context.preferences

    def step(self, step: int) -> dict[str, float]:
        count = self.settings.pairs_per_step
        indices = prompts_for_step(range(len(self.latents.prompts)), step, count, self.context.seed)
        lo, hi = self.context.local_range(count)
        mine = torch.tensor(indices[lo:hi], dtype=torch.long)
        prompts = [self.latents.prompts[i] for i in indices]
        if self.context.prompt_dropout:  # Diffusion-DPO's proportion_empty_prompts
            seed = mix_seed(self.context.seed, step, PROMPT_DROPOUT_STREAM)
            prompts = drop_prompts(prompts, self.context.prompt_dropout, seed)
        return self.dpo_update(
            step,
            prompts[lo:hi],
            self.latents.chosen[mine],
            self.latents.rejected[mine],
            count,
            lo,
        )


@register
class OnlineDPO(_PreferenceStep, Algorithm):
    """Online DPO: pairs from the policy's own ODE samples, best vs worst by the reward (flow_grpo's
    ``dpo`` mode, with a fixed reference)."""

    name = "online_dpo"
    Settings = OnlineDPOSettings
    reward = "any"

    @classmethod
    def needs_reference(cls, settings: OnlineDPOSettings) -> bool:
        return True

    def step(self, step: int) -> dict[str, float]:
        context, settings = self.context, self.settings
        k = settings.samples_per_prompt
        batch, lo, hi = context.step_prompts(step, settings.pairs_per_step, repeat=k)
        if lo % k or hi % k:
            raise VialignInputError(
                f"online_dpo: each process must hold whole groups; make pairs_per_step x samples_per_prompt "
                f"({len(batch)}) a multiple of {k} x the number of processes"
            )
        every = settings.reference_update_every
        if every and step > 1 and (step - 1) % every == 0:  # flow_grpo: before sampling, every N updates
            context.refresh_reference()
        sampler = (
            sde_sampler(context.adapter.kind, noise_level=settings.noise_level)
            if settings.noise_level
            else Sampler()
        )
        sampling_model = (
            context.reference if settings.rollout_model == "reference" else contextlib.nullcontext
        )
        with torch.no_grad(), sampling_model():
            latents, scores = [], []
            for start in range(lo, hi, settings.micro_batch_size * k):
                end = min(start + settings.micro_batch_size * k, hi)
                final = context.rollout(batch[start:end], step, start, sampler).final
                pixels = context.adapter.decode(final)
                scores.append(context.reward(pixels, batch[start:end]).score.float().cpu())
                latents.append(final.float().cpu())
        latents, scores = torch.cat(latents), torch.cat(scores)
        if not torch.isfinite(scores).all():  # argmax/argmin cannot rank NaN: the pairs would be arbitrary
            raise VialignInputError(
                f"step {step}: the reward returned NaN or infinite scores; online_dpo cannot pick a best and "
                "worst sample from them (check the reward's inputs, or lower optim.lr)"
            )
        grouped = scores.view(-1, k)
        best, worst = grouped.argmax(1), grouped.argmin(1)
        rows = torch.arange(len(grouped)) * k
        prompts = [batch[lo + int(r)] for r in rows]
        metrics = self.dpo_update(
            step, prompts, latents[rows + best], latents[rows + worst], settings.pairs_per_step, lo // k
        )
        reward_mean = context.reduce(scores.sum().to(context.adapter.device)) / len(batch)
        metrics["reward/mean"] = float(reward_mean)
        metrics["reward/gap"] = float(
            context.reduce((grouped.max(1).values - grouped.min(1).values).sum().to(context.adapter.device))
            / settings.pairs_per_step
        )
        return metrics
