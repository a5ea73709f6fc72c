"""Reward gradients through the sampler: DRaFT-K, DRaFT-LV, DRaFT+ (Clark et al. 2023) and AlignProp
(Prabhudesai et al. 2023), docs/algorithms.md, "DRaFT and AlignProp".

With a differentiable reward r, the sampler x_0 (noise) -> x_N (latent) and the decoder D, each method
minimises ``L = loss_scale * mean_i l(r(D(x_N^i)))`` (``l`` a transform of ``rewards.losses``: -r, a
hinge or a target; ``vialign.losses.reward_loss``) with gradients through part of the chain:

* **DRaFT-K**: gradients through the last K steps (``grad_steps``); earlier steps run without grad.
* **DRaFT-LV**: K = 1, variance-reduced: the last step is re-run from ``n`` re-noised copies
  ``x'_{N-1} = alpha_{N-1} x_N + sigma_{N-1} eps_j`` (``vialign.losses.renoise``), the loss averaged over them.
* **DRaFT+**: adds ``kl_coeff * mean_k mean_i |f_theta(x_k) - f_ref(x_k)|^2`` over the window's steps
  (``vialign.losses.output_kl``), f the denoiser output and f_ref the reference's (LoRA off, or the frozen copy).
* **AlignProp**: DRaFT-K with K drawn per training step, K ~ N(k_mean, k_std) rounded and clamped to
  [1, N] (randomised truncation).

Every denoiser call in the window (the DRaFT+ term's too) and the VAE decode are checkpointed
(``checkpoint``): memory stays ~ one step whatever K. ``checkpoint: selective`` keeps each step's
matrix-product, convolution and attention outputs and recomputes only the cheap ops between them
(``vialign.sampling.checkpointed``): a faster backward, memory growing with K. ReFL (``refl.py``) shares the settings and helpers here.

On video models ``decode_frames`` (VADER's frame subsets: all, first, first-middle-last, every-k, random)
decodes and scores only some frames: the causal VAE then runs over only the latent frames they need
(``VideoGeneratorAdapter.decode(frames=...)``), and the reward sees those frames alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from rewards.losses import LossTransform
from vialign.algorithms.base import Algorithm, TrainingContext, register
from vialign.errors import VialignInputError
from vialign.losses import output_kl, renoise, reward_loss
from vialign.sampling import Sampler, Trajectory, checkpointed, evaluate_step, sde_sampler
from vialign.schema import StrictModel
from vialign.seeds import mix_seed

DECODE_FRAME_MODES = ("all", "first", "first-middle-last", "every-k", "random")
DECODE_FRAMES_STREAM = 4  # mix_seed(seed, step, stream, start): decode_frames=random's frame of a micro-batch


class RewardGradientSettings(StrictModel):
    """Settings every reward-gradient method has (DRaFT, AlignProp, ReFL)."""

    prompts_per_step: int = Field(8, ge=1, le=4096, description="prompts (one sample each) per training step")
    micro_batch_size: int = Field(4, ge=1, le=4096, description="samples per backward pass (memory)")
    loss: Literal["negate", "hinge", "target"] = Field("negate", description="reward -> loss transform")
    margin: float | None = Field(None, description="hinge: relu(margin - r)")
    target: float | None = Field(None, description="target: |r - target|")
    loss_scale: float = Field(1.0, gt=0, description="multiplies the reward loss (ReFL uses 1e-3)")
    eta: float = Field(
        0.0, ge=0, le=10, description="noise of the sampler: DDIM eta / Flow-SDE a (0: the ODE)"
    )
    checkpoint: bool | Literal["selective"] = Field(
        True,
        description="recompute each window step's activations in backward (memory flat in K); 'selective': "
        "keep matrix-product/convolution/attention outputs, recompute the rest (faster, memory grows with K)",
    )
    decode_frames: Literal["all", "first", "first-middle-last", "every-k", "random"] = Field(
        "all",
        description="video models: the frames decoded and scored (VADER's subsets): all, first, "
        "first-middle-last, every-k (frames 0, k, 2k, ...; decode_every), random (one frame per micro-batch, "
        "seeded); the causal VAE decodes only the latent frames they need. Images: all",
    )
    decode_every: int | None = Field(
        None, ge=1, le=1024, description="decode_frames=every-k (required there): k"
    )

    @model_validator(mode="after")
    def _decode_every_for_every_k(self) -> RewardGradientSettings:
        if self.decode_frames == "every-k" and self.decode_every is None:
            raise ValueError("decode_frames=every-k needs decode_every: k, e.g. decode_every: 4")
        if self.decode_frames != "every-k" and self.decode_every is not None:
            raise ValueError(
                "decode_every is k of decode_frames=every-k; this run has "
                f"decode_frames={self.decode_frames}: "
                "set decode_frames=every-k, or drop decode_every"
            )
        return self


class DraftSettings(RewardGradientSettings):
    """The ``draft:`` section."""

    grad_steps: int = Field(1, ge=1, description="DRaFT-K: gradients through the last K steps")
    lv_samples: int = Field(
        0, ge=0, le=64, description="DRaFT-LV: re-noise the last step this many times (0: off)"
    )
    kl_coeff: float = Field(0.0, ge=0, description="DRaFT+: coeff of |f_theta - f_ref|^2 over the window")
    offload: bool = Field(False, description="keep saved activations on the CPU (torch save_on_cpu)")


class AlignPropSettings(RewardGradientSettings):
    """The ``alignprop:`` section."""

    k_mean: float = Field(1.0, gt=0, description="K ~ N(k_mean, k_std^2) per training step")
    k_std: float = Field(0.0, ge=0, description="std of K (0: DRaFT-K with K = k_mean)")
    kl_coeff: float = Field(
        0.0, ge=0, description="DRaFT+'s term: coeff of |f_theta - f_ref|^2 over the window"
    )
    offload: bool = Field(False, description="keep saved activations on the CPU (torch save_on_cpu)")


def gradient_sampler(context: TrainingContext, eta: float) -> Sampler:
    """The sampler of reward-gradient rollouts: the ODE, or the model kind's SDE with noise ``eta``."""
    return sde_sampler(context.adapter.kind, noise_level=eta) if eta > 0 else Sampler()


def decoded_frames(
    mode: str, num_frames: int, every: int | None = None, generator: torch.Generator | None = None
) -> list[int] | None:
    """Which frames of a ``num_frames`` video a reward-gradient step decodes (``decode_frames``): None
    for all of them, else indices in increasing order. ``random`` draws one frame from ``generator``."""
    if mode == "all":
        return None
    if mode == "first":
        return [0]
    if mode == "first-middle-last":
        return sorted({0, (num_frames - 1) // 2, num_frames - 1})
    if mode == "every-k":
        if every is None or every < 1:
            raise VialignInputError(f"decode_frames=every-k needs decode_every >= 1, got {every!r}")
        return list(range(0, num_frames, every))
    if mode == "random":
        return [int(torch.randint(num_frames, (), generator=generator))]
    raise VialignInputError(f"unknown decode_frames {mode!r}; choose one of {', '.join(DECODE_FRAME_MODES)}")


def check_decode_frames(context: TrainingContext, settings: RewardGradientSettings, section: str) -> None:
    """``decode_frames`` other than all is for video models."""
    if settings.decode_frames != "all" and context.num_frames is None:
        raise VialignInputError(
            f"{section}.decode_frames={settings.decode_frames} picks frames of videos, but "
            f"{context.adapter.family} generates images: leave {section}.decode_frames at all"
        )


def decode_for_reward(
    context: TrainingContext,
    settings: RewardGradientSettings,
    latents: torch.Tensor,
    step: int,
    start: int,
) -> torch.Tensor:
    """``latents`` decoded (checkpointed when ``settings.checkpoint``), differentiably: images, or a
    video model's frames that ``decode_frames`` picks (``B x F' x 3 x H x W``; the reward sees those only).
    ``random`` draws its frame from (seed, step, ``start``), the same on every process."""
    checkpoint = bool(settings.checkpoint)
    if context.num_frames is None or settings.decode_frames == "all":
        return context.adapter.decode(latents, checkpoint=checkpoint)
    generator = torch.Generator().manual_seed(mix_seed(context.seed, step, DECODE_FRAMES_STREAM, start))
    frames = decoded_frames(settings.decode_frames, context.num_frames, settings.decode_every, generator)
    return context.adapter.decode(latents, checkpoint=checkpoint, frames=frames)


def score_with_gradient(context: TrainingContext, pixels: torch.Tensor, prompts: Sequence[str], step: int):
    """The training reward of ``pixels`` (differentiable); a NaN or infinite score is an error, since a
    gradient method cannot skip one sample of a backward pass."""
    score = context.reward(pixels, list(prompts)).score
    if not torch.isfinite(score).all():
        raise VialignInputError(
            f"step {step}: the reward returned NaN or infinite scores; a gradient method cannot skip "
            "them (check the reward's inputs, or lower optim.lr)"
        )
    return score


def reward_gradient_metrics(context: TrainingContext, scores: list, losses: list) -> dict[str, float]:
    score = context.gather(torch.cat(scores).float())
    return {
        "reward/mean": float(score.mean()),
        "reward/std": float(score.std(unbiased=False)) if score.numel() > 1 else 0.0,
        "loss": float(context.reduce(torch.stack(losses).sum())),
    }


def sample_k(mean: float, std: float, num_steps: int, generator: torch.Generator) -> int:
    """AlignProp's randomised truncation: K ~ N(mean, std), rounded, clamped to [1, num_steps]."""
    k = round(mean + std * float(torch.randn((), generator=generator)))
    return int(min(num_steps, max(1, k)))


@register
class DRaFT(Algorithm):
    """DRaFT-K / DRaFT-LV / DRaFT+; see the module docstring."""

    name = "draft"
    Settings = DraftSettings
    reward = "differentiable"

    @classmethod
    def needs_reference(cls, settings) -> bool:
        return settings.kl_coeff > 0

    @classmethod
    def check_settings(cls, settings, num_steps: int | None) -> None:
        key, k = cls.window_size(settings)
        if num_steps is not None and k > num_steps:
            raise VialignInputError(
                f"{cls.name}.{key} = {k} exceeds the {num_steps} sampling steps (sampler.num_steps)"
            )

    @classmethod
    def window_size(cls, settings) -> tuple[str, float]:
        """(key, value) of the setting that bounds the gradient window."""
        return "grad_steps", settings.grad_steps

    def __init__(self, settings, context: TrainingContext):
        super().__init__(settings, context)
        self.check_settings(settings, context.num_steps)
        check_decode_frames(context, settings, self.name)
        self.schedule = context.schedule
        self.sampler = gradient_sampler(context, settings.eta)
        self.transform = LossTransform(settings.loss, settings.margin, settings.target)

    def grad_steps(self, step: int) -> int:
        """K of training step ``step``."""
        return self.settings.grad_steps

    def lv_samples(self) -> int:
        return self.settings.lv_samples

    def step(self, step: int) -> dict[str, float]:
        context, settings, adapter = self.context, self.settings, self.context.adapter
        prompts, lo, hi = context.step_prompts(step, settings.prompts_per_step)
        k, lv = self.grad_steps(step), self.lv_samples()
        repeats = max(1, lv)
        started = time.perf_counter()
        scores, losses, kls = [], [], []
        with context.train_mode():
            for start in range(lo, hi, settings.micro_batch_size):
                end = min(start + settings.micro_batch_size, hi)
                batch_prompts = prompts[start:end]
                trajectory = context.rollout(
                    batch_prompts,
                    step,
                    start,
                    self.sampler,
                    checkpoint=settings.checkpoint,
                    offload=settings.offload,
                    grad_steps=0 if lv else k,  # DRaFT-LV re-runs the last step itself
                )
                loss = torch.zeros((), device=adapter.device)
                for repeat in range(repeats):
                    final = self.lv_final(trajectory, step, start, repeat) if lv else trajectory.final
                    pixels = decode_for_reward(context, settings, final, step, start)
                    score = score_with_gradient(context, pixels, batch_prompts, step)
                    scores.append(score.detach())
                    loss = loss + reward_loss(
                        score, self.transform, settings.loss_scale, len(prompts) * repeats
                    )
                if settings.kl_coeff:
                    kl = self.window_kl(trajectory, k)  # [B]
                    kls.append(kl.detach())
                    loss = loss + settings.kl_coeff * kl.sum() / len(prompts)
                context.backward(loss)
                losses.append(loss.detach())
            grad_norm = context.optimizer_step(step)
        metrics = reward_gradient_metrics(context, scores, losses)
        metrics.update(
            {"grad_steps": k, "grad_norm": grad_norm, "time/train_s": time.perf_counter() - started}
        )
        if kls:
            metrics["kl"] = float(context.gather(torch.cat(kls)).mean())
        return metrics

    def lv_final(self, trajectory: Trajectory, step: int, start: int, repeat: int) -> torch.Tensor:
        """DRaFT-LV: re-noise x_N to the last step's level and re-run that step with grad."""
        last = self.context.num_steps - 1
        x_final = trajectory.latents[:, -1].detach()
        generator = torch.Generator().manual_seed(self.context.sample_seed(step, 2**41 + start * 64 + repeat))
        noise = torch.randn(x_final.shape, generator=generator).to(x_final.device)
        noisy = renoise(x_final, noise, self.schedule.alphas[last], self.schedule.sigmas[last])
        return evaluate_step(
            self.context.adapter,
            self.schedule,
            self.sampler,
            last,
            noisy,
            trajectory.cond,
            guidance=self.context.guidance,
            uncond=trajectory.uncond,
            stochastic=False,
        ).x_next

    def window_kl(self, trajectory: Trajectory, k: int) -> torch.Tensor:
        """DRaFT+: per sample, the mean over the window's k steps of ``output_kl`` of the policy's and the
        reference's outputs at the stored states; each policy call checkpointed."""
        adapter, n = self.context.adapter, self.context.num_steps
        total = torch.zeros(len(trajectory), device=adapter.device)
        for index in range(n - k, n):
            args = (
                trajectory.latents[:, index],
                self.schedule.timesteps[index],
                trajectory.cond,
                self.context.guidance,
                trajectory.uncond,
            )
            with torch.no_grad(), self.context.reference():
                reference = adapter.predict(*args)
            output = checkpointed(adapter.predict, *args, mode=self.settings.checkpoint)
            total = total + output_kl(output, reference)
        return total / k


@register
class AlignProp(DRaFT):
    """DRaFT-K with K drawn anew each training step (randomised truncation)."""

    name = "alignprop"
    Settings = AlignPropSettings

    @classmethod
    def window_size(cls, settings) -> tuple[str, float]:
        return "k_mean", settings.k_mean

    def grad_steps(self, step: int) -> int:
        generator = torch.Generator().manual_seed(self.context.seed * 104_729 + step)
        return sample_k(self.settings.k_mean, self.settings.k_std, self.context.num_steps, generator)

    def lv_samples(self) -> int:
        return 0
