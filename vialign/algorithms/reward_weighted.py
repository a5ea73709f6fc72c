"""RAFT and reward-weighted regression: the ordinary denoising loss on the policy's own samples, filtered
(RAFT) or weighted (RWR) by their reward (docs/algorithms.md, "RAFT and RWR").

A step: K samples of each of P prompts from the current policy (ODE, no gradient), decoded and scored;
every sample i gets a weight w_i from the rewards of the global batch; then, for ``updates_per_step``
optimizer updates, each sample draws one (noise, t) and::

    x_t = alpha_t x0_i + sigma_t eps                            (x0_i: the sample's own final latent)
    e_i = mean |f_theta(x_t, t, c_i) - target_i|^2              (eps, v or the flow velocity eps - x0)
    L   = sum_i w_i e_i / N                                     (N: kept samples for RAFT, P x K for RWR)

- RAFT (Dong et al. 2023, "RAFT: Reward rAnked FineTuning", arXiv:2304.06767, Alg. 1): w_i = 1 for the
  best of each prompt's K samples (``selection: per_prompt``, LMFlow's local ranking) or for the top
  ``keep_fraction`` of the batch (``global``), 0 for the rest: supervised fine-tuning on the ranked-best.
- RWR: Flow-RWR (Liu et al. 2025, "Improving Video Generation with Human Feedback", arXiv:2501.13918,
  Eq. 9) weighs the flow-matching loss by w_i = exp(r_i / tau); for diffusion models the same loss on the
  eps / v target is the reward-weighted likelihood of Lee et al. 2023 (arXiv:2302.12192).
  ``normalize: batch`` divides the weights by their batch mean (a softmax over the batch times B).

t is drawn as for DPO (``vialign.algorithms.dpo.dpo_timesteps``: uniform for diffusion models,
logit-normal for flow models) from the (seed, step) generator for the whole global batch, so a sample
draws the same (noise, t) whichever process holds it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
from pydantic import Field

from pipelines.adapter import Guidance
from vialign.advantages import raft_selection, rwr_weights
from vialign.algorithms.base import Algorithm, register
from vialign.algorithms.dpo import dpo_timesteps, pair_errors
from vialign.errors import VialignInputError
from vialign.sampling import Sampler
from vialign.schema import StrictModel

logger = logging.getLogger(__name__)

REGRESSION_DRAWS = 2**44  # sample_seed index of a step's (noise, t) generator: not a sample's noise


class RegressionSettings(StrictModel):
    """What RAFT and RWR share: the samples of a step and the denoising loss's t."""

    prompts_per_step: int = Field(16, ge=1, le=4096, description="prompts per training step (all processes)")
    samples_per_prompt: int = Field(4, ge=1, le=1024, description="policy samples of each prompt (K)")
    micro_batch_size: int = Field(16, ge=1, le=4096, description="samples per denoiser / decoder call")
    updates_per_step: int = Field(
        1, ge=1, le=100, description="optimizer updates per step, each a pass over the step's samples"
    )
    logit_mean: float = Field(0.0, description="flow models: mean of the logit-normal t")
    logit_std: float = Field(1.0, gt=0, description="flow models: std of the logit-normal t")
    shift_timesteps: bool = Field(
        False, description="flow models: the logit-normal t through the scheduler's static shift"
    )
    rollout_model: Literal["policy", "reference"] = Field(
        "policy",
        description="whose samples are ranked and fitted: the current policy's (the papers: an online, "
        "self-consuming loop) or the reference model's (rejection-sampling fine-tuning: the target stays "
        "the best of the initial model's samples, so the loop cannot drift)",
    )
    targets: Literal["reencoded", "final"] = Field(
        "reencoded",
        description="the x0 the loss fits: the decoded samples encoded again by the VAE (its posterior mean, "
        "the latents pre-training fitted; as diffusers' scripts fit images) or the sampler's final latents "
        "as they are (no VAE pass, but they can sit off the encoder's range)",
    )
    loss_guidance: Literal["conditional", "sampling"] = Field(
        "conditional",
        description="conditional: the loss fits the conditional prediction, as pre-training and the papers do "
        "(use data.prompt_dropout to keep the unconditional branch in tune); sampling: the CFG-guided "
        "prediction the samples came from, both branches trained (on the testbed it raised the learned "
        "reward but cost 10 points on the pretraining prompts in 80 steps)",
    )


class RAFTSettings(RegressionSettings):
    """The ``raft:`` section."""

    selection: Literal["per_prompt", "global"] = Field(
        "per_prompt",
        description="per_prompt: the best of each prompt's K samples; global: the top keep_fraction of the "
        "step's batch (LMFlow's local / top ranking)",
    )
    keep_fraction: float = Field(
        0.2, gt=0, le=1, description="selection=global: the share of the batch kept (LMFlow's default 0.2)"
    )


class RWRSettings(RegressionSettings):
    """The ``rwr:`` section."""

    temperature: float = Field(1.0, gt=0, description="tau in exp(r / tau)")
    normalize: Literal["none", "batch"] = Field(
        "none",
        description="none: w = exp(r / tau) as Flow-RWR; batch: divided by the batch mean (average weight 1, "
        "the loss scale independent of the reward's level)",
    )


class _RewardWeightedRegression(Algorithm):
    """Sample, score, weigh, regress: the step of RAFT and RWR (module docstring)."""

    settings: RegressionSettings

    @classmethod
    def needs_reference(cls, settings: RegressionSettings) -> bool:
        return settings.rollout_model == "reference"

    def weights(self, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Per-sample weights [B] of the global batch and the loss's normaliser N."""
        raise NotImplementedError

    def step(self, step: int) -> dict[str, float]:
        context, settings, adapter = self.context, self.settings, self.context.adapter
        k, micro = settings.samples_per_prompt, settings.micro_batch_size
        batch, lo, hi = context.step_prompts(step, settings.prompts_per_step, repeat=k)
        local_prompts = batch[lo:hi]

        # 1. the policy's (or the reference's) samples (ODE, no gradient), decoded and scored
        sampling_model = (
            context.reference if settings.rollout_model == "reference" else contextlib.nullcontext
        )
        with torch.no_grad(), sampling_model():
            final = context.rollout(local_prompts, step, lo, Sampler(), model_batch_size=micro).final
            pixels = torch.cat([adapter.decode(final[i : i + micro]) for i in range(0, len(final), micro)])
            local_scores = context.reward(pixels, local_prompts).score.float()
        scores = context.gather(local_scores).cpu()
        nonfinite = int((~torch.isfinite(scores)).sum())
        if nonfinite == len(scores):
            raise VialignInputError(
                f"{self.name}: every reward of step {step} is NaN or infinite, so no sample can be weighted; "
                "check the reward's inputs, or lower optim.lr"
            )
        if nonfinite:
            logger.warning(
                "step %d: %d sample(s) with a NaN or infinite reward get weight 0", step, nonfinite
            )

        # 2. weights from the whole global batch (the same on every process)
        weights, normaliser = self.weights(scores)
        local_weights = weights[lo:hi]
        trained = torch.nonzero(local_weights > 0).flatten().tolist()
        if settings.targets == "reencoded" and trained:  # only the samples the loss will see
            with torch.no_grad():
                encoded = torch.cat(
                    [
                        adapter.encode(pixels[trained[i : i + micro]], sample=False)
                        for i in range(0, len(trained), micro)
                    ]
                )
            final = final.clone()
            final[trained] = encoded.to(final.dtype)

        # 3. the weighted denoising loss on the samples' own latents
        generator = torch.Generator().manual_seed(context.sample_seed(step, REGRESSION_DRAWS))
        guidance = (
            context.guidance
            if settings.loss_guidance == "sampling"
            else Guidance(embedded=context.guidance.embedded)
        )
        losses, grad_norms = [], []
        for _ in range(settings.updates_per_step):
            t_all = dpo_timesteps(adapter, len(batch), settings, generator)
            noise_all = torch.randn((len(batch), *final.shape[1:]), generator=generator)
            total = torch.zeros((), device=adapter.device)
            with context.train_mode():
                for start in range(0, len(trained), micro):
                    rows = trained[start : start + micro]
                    index = torch.tensor(rows)
                    cond = adapter.encode_prompt([local_prompts[r] for r in rows])
                    uncond = adapter.uncond_embeds(len(rows)) if guidance.uses_uncond else None
                    errors = pair_errors(
                        adapter,
                        final[index].float(),
                        noise_all[index + lo].to(adapter.device),
                        t_all[index + lo],
                        cond,
                        guidance,
                        uncond,
                    )
                    loss = (local_weights[index].to(errors.device) * errors).sum() / normaliser
                    context.backward(loss)
                    total = total + loss.detach()
            grad_norms.append(context.optimizer_step(step))
            losses.append(float(context.reduce(total)))
        finite = scores[torch.isfinite(scores)]
        grouped = scores.view(-1, k)
        return {
            "loss": losses[-1],
            "reward/mean": float(finite.mean()) if finite.numel() else float("nan"),
            "reward/std": float(finite.std(unbiased=False)) if finite.numel() > 1 else 0.0,
            "reward/trained_mean": float((weights * scores.nan_to_num(0.0)).sum() / weights.sum())
            if weights.sum() > 0
            else float("nan"),
            "reward/gap": float((grouped.max(1).values - grouped.min(1).values).nanmean()),
            "weight/max": float(weights.max()),
            "weight/effective_samples": float(weights.sum() ** 2 / weights.square().sum())
            if weights.sum() > 0
            else 0.0,
            "trained_samples": int((weights > 0).sum()),
            "grad_norm": grad_norms[-1],
        }


@register
class RAFT(_RewardWeightedRegression):
    """RAFT: fine-tune on the best of the policy's own samples (module docstring)."""

    name = "raft"
    Settings = RAFTSettings
    reward = "any"

    def weights(self, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
        settings = self.settings
        keep = raft_selection(
            scores, settings.samples_per_prompt, mode=settings.selection, fraction=settings.keep_fraction
        )
        return keep.float(), float(keep.sum())


@register
class RWR(_RewardWeightedRegression):
    """Reward-weighted regression: every sample's denoising loss weighted by exp(r / tau)."""

    name = "rwr"
    Settings = RWRSettings
    reward = "any"

    def weights(self, scores: torch.Tensor) -> tuple[torch.Tensor, float]:
        weights = rwr_weights(scores, self.settings.temperature, normalize=self.settings.normalize)
        if not torch.isfinite(weights).all():
            raise VialignInputError(
                f"rwr: exp(r / {self.settings.temperature:g}) overflows for a reward of {float(scores.max()):g}: "
                "raise rwr.temperature or set rwr.normalize: batch"
            )
        return weights, float(len(scores))
