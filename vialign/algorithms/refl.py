"""ReFL (Xu et al. 2023, "ImageReward", Algorithm 1), docs/algorithms.md, "ReFL".

Sample without gradients down to a step s ~ U[T1, T2], make one denoiser call with gradients, and score
the one-shot prediction of the clean latent::

    x0_hat(x_s) = convert(f_theta(x_s, t_s)).x0        (x - sigma v for flow models, (x - sigma eps) / alpha for eps)
    L = loss_scale * mean_i l(r(D(x0_hat_i)))          (vialign.losses.reward_loss)

The paper notes that ReFL alone degrades the model and regularises it with the ordinary denoising loss on
captioned images (``regularizer_data``: a JSONL of ``{file, prompt}`` rows; ``vialign.losses.denoising_loss``),
weighted by ``regularizer_weight``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.embeds import PromptEmbeds
from pipelines.schedules import Schedule
from rewards.losses import LossTransform
from vialign.algorithms.base import Algorithm, TrainingContext, register
from vialign.algorithms.draft import (
    RewardGradientSettings,
    check_decode_frames,
    decode_for_reward,
    gradient_sampler,
    reward_gradient_metrics,
    score_with_gradient,
)
from vialign.errors import VialignInputError
from vialign.losses import denoising_loss, reward_loss
from vialign.media import read_image


class ReFLSettings(RewardGradientSettings):
    """The ``refl:`` section."""

    steps: tuple[int, int] = Field(
        (0, 0),
        description="[T1, T2]: the gradient step is drawn uniformly in it (0, 0: the last quarter of the steps)",
    )
    regularizer_data: str | None = Field(
        None,
        description="JSONL of {file, prompt} rows (images next to it) for the denoising-loss regulariser",
    )
    regularizer_weight: float = Field(1.0, ge=0, description="weight of the denoising loss")


def step_range(settings: ReFLSettings, num_steps: int) -> tuple[int, int]:
    """[T1, T2] of ``settings.steps``, the default (0, 0) being the last quarter of ``num_steps``."""
    low, high = settings.steps
    if (low, high) == (0, 0):
        return num_steps - max(1, num_steps // 4), num_steps - 1
    return low, high


def one_step_x0(
    adapter: GeneratorAdapter,
    schedule: Schedule,
    s: int,
    x: torch.Tensor,
    cond: PromptEmbeds,
    guidance: Guidance,
    uncond: PromptEmbeds | None,
) -> torch.Tensor:
    """x0_hat(x_s): one denoiser call at step ``s``, converted to the clean-latent prediction."""
    output = adapter.predict(x, schedule.timesteps[s], cond, guidance, uncond)
    return adapter.convert(output, x, schedule.alphas[s], schedule.sigmas[s]).x0


@register
class ReFL(Algorithm):
    """See the module docstring."""

    name = "refl"
    Settings = ReFLSettings
    reward = "differentiable"

    @classmethod
    def check_settings(cls, settings: ReFLSettings, num_steps: int | None) -> None:
        low, high = settings.steps
        if (low, high) != (0, 0) and (low > high or (num_steps is not None and high >= num_steps)):
            raise VialignInputError(
                f"refl.steps = {[low, high]} must satisfy 0 <= T1 <= T2 < the {num_steps} sampling steps"
            )

    def __init__(self, settings: ReFLSettings, context: TrainingContext):
        super().__init__(settings, context)
        self.check_settings(settings, context.num_steps)
        check_decode_frames(context, settings, self.name)
        if settings.regularizer_data and context.num_frames is not None:
            raise VialignInputError(
                "refl.regularizer_data is a set of captioned images; on a video model "
                f"({context.adapter.family}) train without it (remove refl.regularizer_data)"
            )
        self.schedule = context.schedule
        self.sampler = gradient_sampler(context, settings.eta)
        self.transform = LossTransform(settings.loss, settings.margin, settings.target)
        self.steps = step_range(settings, context.num_steps)
        self.regularizer = (
            load_captioned_latents(settings.regularizer_data, context) if settings.regularizer_data else None
        )

    def step(self, step: int) -> dict[str, float]:
        context, settings, adapter = self.context, self.settings, self.context.adapter
        prompts, lo, hi = context.step_prompts(step, settings.prompts_per_step)
        generator = torch.Generator().manual_seed(context.seed * 15_485_863 + step)
        s = int(torch.randint(self.steps[0], self.steps[1] + 1, (), generator=generator))
        started = time.perf_counter()
        scores, losses = [], []
        with context.train_mode():
            for start in range(lo, hi, settings.micro_batch_size):
                end = min(start + settings.micro_batch_size, hi)
                batch_prompts = prompts[start:end]
                with torch.no_grad():  # x_s, no gradients
                    trajectory = context.rollout(batch_prompts, step, start, self.sampler, stop=s)
                x0 = one_step_x0(
                    adapter,
                    self.schedule,
                    s,
                    trajectory.final,
                    trajectory.cond,
                    context.guidance,
                    trajectory.uncond,
                )
                pixels = decode_for_reward(context, settings, x0, step, start)
                score = score_with_gradient(context, pixels, batch_prompts, step)
                scores.append(score.detach())
                loss = reward_loss(score, self.transform, settings.loss_scale, len(prompts))
                context.backward(loss)
                losses.append(loss.detach())
            regularizer = None
            if self.regularizer is not None:
                regularizer = self.regularizer_loss(step, settings.micro_batch_size)
                context.backward(settings.regularizer_weight * regularizer / context.world_size)
            grad_norm = context.optimizer_step(step)
        metrics = reward_gradient_metrics(context, scores, losses)
        metrics.update(
            {"grad_steps": 1, "grad_norm": grad_norm, "time/train_s": time.perf_counter() - started}
        )
        if regularizer is not None:
            metrics["regularizer_loss"] = float(context.reduce(regularizer.detach(), "mean"))
        return metrics

    def regularizer_loss(self, step: int, count: int) -> torch.Tensor:
        """The ordinary denoising loss on ``count`` captioned images (drawn by the step, the same on every
        process: each process's share is 1 / world_size of it)."""
        adapter = self.context.adapter
        latents, prompts = self.regularizer
        generator = torch.Generator().manual_seed(self.context.seed * 7_919 + step)
        index = torch.randint(len(prompts), (count,), generator=generator)
        x0 = latents[index].to(adapter.device)
        noise = torch.randn(x0.shape, generator=generator).to(adapter.device)
        total = adapter.scheduler.config.num_train_timesteps
        if adapter.kind == "flow":
            t = torch.rand(count, generator=generator) * total
        else:
            t = torch.randint(total, (count,), generator=generator).float()
        alpha, sigma = adapter.coefficients(t.to(adapter.device))
        alpha, sigma = alpha.view(-1, 1, 1, 1).float(), sigma.view(-1, 1, 1, 1).float()
        # the conditional prediction; a guidance-distilled FLUX still takes its guidance embedding
        guidance = Guidance(embedded=self.context.guidance.embedded)
        output = adapter.predict(
            alpha * x0 + sigma * noise, t, adapter.encode_prompt([prompts[i] for i in index]), guidance
        )
        return denoising_loss(output, adapter.prediction_type, x0, noise, alpha, sigma)


def load_captioned_latents(path: str, context: TrainingContext) -> tuple[torch.Tensor, list[str]]:
    """The latents (VAE means) and prompts of a JSONL of ``{file, prompt}`` rows, images resized to the
    training size."""
    path = Path(path)
    if not path.is_file():
        raise VialignInputError(f"refl.regularizer_data: {path} not found (a JSONL of file, prompt rows)")
    images, prompts = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "file" not in row or "prompt" not in row:
            raise VialignInputError(f"{path}:{number}: each row needs 'file' and 'prompt'")
        images.append(read_image(path.parent / row["file"]))
        prompts.append(row["prompt"])
    size = (context.height, context.width)
    pixels = torch.stack(
        [F.interpolate(i[None], size=size, mode="bilinear", antialias=True)[0] for i in images]
    )
    with torch.no_grad():
        latents = torch.cat(
            [context.adapter.encode(pixels[i : i + 16], sample=False) for i in range(0, len(pixels), 16)]
        )
    return latents, prompts
