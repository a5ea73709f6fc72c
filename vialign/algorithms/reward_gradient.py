"""Reward gradients through the sampler: DRaFT-K, DRaFT-LV, DRaFT+, AlignProp and ReFL.

With a differentiable reward r and a sampler x_0 (noise) -> x_N (latent) -> pixels = D(x_N), every method
minimises ``L = loss_scale * l(r(D(x_N)))`` (``l`` a transform from ``rewards.losses``: -r, a hinge or a
target) with gradients through part of the chain (DESIGN.md section 5):

* **DRaFT-K** (Clark et al. 2023): gradients through the last K steps; earlier steps run without grad.
* **AlignProp** (Prabhudesai et al. 2023): the same with K drawn per training step, K ~ N(mean, std)
  rounded and clamped to [1, N] (randomised truncation).
* **DRaFT-LV**: K = 1, variance-reduced: the last step is re-run from ``n`` re-noised copies
  ``x'_{N-1} = alpha_{N-1} x_N + sigma_{N-1} eps_i``, and the loss averaged over them.
* **DRaFT+**: adds ``kl_coeff * |f_theta(x_k) - f_init(x_k)|^2`` (mean over dims) at the window's steps, f the
  denoiser output and f_init the reference's (LoRA off, or the frozen copy).
* **ReFL** (Xu et al. 2023, ImageReward): no grad down to a step s ~ U[T1, T2], one denoiser call with grad,
  then the one-shot prediction x0_hat(x_s) is decoded and scored. Optionally regularised by the ordinary
  denoising loss on captioned images (the paper says ReFL degrades without it).

Every denoiser call in the window and the VAE decode are checkpointed (``gradient.checkpoint``): memory
stays ~ one step whatever K. Gradients are averaged over processes before each optimizer step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.losses import LossTransform
from vialign.errors import VialignInputError

logger = logging.getLogger(__name__)


def sample_k(mean: float, std: float, num_steps: int, generator: torch.Generator) -> int:
    """AlignProp's randomised truncation: K ~ N(mean, std), rounded, clamped to [1, num_steps]."""
    k = round(mean + std * float(torch.randn((), generator=generator)))
    return int(min(num_steps, max(1, k)))


def denoising_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma
) -> torch.Tensor:
    """What the denoiser should output at ``alpha x0 + sigma noise``, in its own units."""
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    return x0  # "sample"


class RewardGradient:
    """``config.algorithm`` in draft / alignprop / refl; see the module docstring."""

    def __init__(self, config, trainer):
        from vialign.sampling import Sampler

        self.config, self.trainer, self.settings = config, trainer, config.gradient
        adapter = trainer.adapter
        self.num_steps = config.sampler.num_steps or adapter.default_num_steps
        settings = self.settings
        if config.algorithm == "draft" and settings.grad_steps > self.num_steps:
            raise VialignInputError(
                f"gradient.grad_steps = {settings.grad_steps} exceeds the {self.num_steps} sampling steps"
            )
        self.height, self.width = trainer.image_size()
        self.schedule = adapter.schedule(self.num_steps, self.height, self.width)
        self.guidance = adapter.make_guidance(config.sampler.guidance_scale)
        sde = "ddim" if adapter.kind == "diffusion" else "flow-sde"
        self.sampler = Sampler(sde=sde, noise_level=settings.eta) if settings.eta > 0 else Sampler()
        self.transform = LossTransform(settings.loss, settings.margin, settings.target)
        low, high = settings.refl_steps
        if (low, high) == (0, 0):
            low, high = self.num_steps - max(1, self.num_steps // 4), self.num_steps - 1
        if config.algorithm == "refl" and not 0 <= low <= high < self.num_steps:
            raise VialignInputError(
                f"gradient.refl_steps {[low, high]} must lie in [0, {self.num_steps - 1}]"
            )
        self.refl_range = (low, high)
        self.regularizer = self._load_regularizer() if settings.regularizer_data else None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ ReFL's denoising regulariser
    def _load_regularizer(self) -> tuple[torch.Tensor, list[str]]:
        from vialign.media import read_image

        path = Path(self.settings.regularizer_data)
        if not path.is_file():
            raise VialignInputError(
                f"gradient.regularizer_data: {path} not found (a JSONL of file, prompt rows)"
            )
        images, prompts = [], []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "file" not in row or "prompt" not in row:
                raise VialignInputError(f"{path}:{number}: each row needs 'file' and 'prompt'")
            images.append(read_image(path.parent / row["file"]))
            prompts.append(row["prompt"])
        pixels = torch.stack(
            [
                F.interpolate(i[None], size=(self.height, self.width), mode="bilinear", antialias=True)[0]
                for i in images
            ]
        )
        with torch.no_grad():
            latents = torch.cat(
                [
                    self.trainer.adapter.encode(pixels[i : i + 16], sample=False)
                    for i in range(0, len(pixels), 16)
                ]
            )
        return latents, prompts

    def regularizer_loss(self, step: int, count: int) -> torch.Tensor:
        """The ordinary denoising loss on ``count`` captioned images (seeded by the step)."""
        adapter = self.trainer.adapter
        latents, prompts = self.regularizer
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + step)
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
        output = adapter.predict(
            alpha * x0 + sigma * noise, t, adapter.encode_prompt([prompts[i] for i in index])
        )
        return F.mse_loss(output, denoising_target(adapter.prediction_type, x0, noise, alpha, sigma))

    # ------------------------------------------------------------------ the training step
    def window(self, step: int) -> int:
        settings = self.settings
        if self.config.algorithm == "alignprop" and settings.alignprop_k_mean > 0:
            generator = torch.Generator().manual_seed(self.config.seed * 104_729 + step)
            return sample_k(settings.alignprop_k_mean, settings.alignprop_k_std, self.num_steps, generator)
        return 1 if self.config.algorithm == "refl" else settings.grad_steps

    def _final_latents(self, prompts, seeds, k: int, step: int):
        """x_N (or ReFL's x0_hat) with gradients through the last ``k`` steps, and the trajectory."""
        from vialign.sampling import draw_noise, evaluate_step, rollout_prompts

        adapter, settings = self.trainer.adapter, self.settings
        options = dict(
            height=self.height,
            width=self.width,
            guidance=self.guidance,
            sampler=self.sampler,
            checkpoint=settings.checkpoint,
            offload=settings.offload,
        )
        if self.config.algorithm != "refl":
            lv = settings.lv_samples > 0  # DRaFT-LV re-runs the last step itself, from re-noised copies
            trajectory = rollout_prompts(
                adapter, prompts, seeds, self.schedule, grad_steps=0 if lv else k, **options
            )
            return trajectory.final, trajectory
        # ReFL: no grad down to step s, one call with grad, the one-shot x0 prediction
        generator = torch.Generator().manual_seed(self.config.seed * 15_485_863 + step)
        s = int(torch.randint(self.refl_range[0], self.refl_range[1] + 1, (), generator=generator))
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        cond = adapter.encode_prompt(prompts)
        uncond = adapter.uncond_embeds(len(prompts)) if self.guidance.uses_uncond else None
        x = adapter.initial_latents(generators, len(prompts), self.height, self.width, self.schedule).float()
        stochastic = self.sampler.stochastic_steps(self.num_steps)
        with torch.no_grad():
            for index in range(s):
                noise = draw_noise(generators, x.shape, x.device) if stochastic[index] else None
                x = evaluate_step(
                    adapter,
                    self.schedule,
                    self.sampler,
                    index,
                    x,
                    cond,
                    guidance=self.guidance,
                    uncond=uncond,
                    stochastic=bool(stochastic[index]),
                    noise=noise,
                ).x_next
        output = adapter.predict(x, self.schedule.timesteps[s], cond, self.guidance, uncond)
        x0 = adapter.convert(output, x, self.schedule.alphas[s], self.schedule.sigmas[s]).x0
        return x0, None

    def _kl_term(self, trajectory, k: int) -> torch.Tensor:
        """DRaFT+: mean squared difference of the policy's and the reference's outputs over the window."""
        adapter, n = self.trainer.adapter, self.num_steps
        total = torch.zeros((), device=adapter.device)
        for index in range(n - k, n):
            x = trajectory.latents[:, index]
            args = (x, self.schedule.timesteps[index], trajectory.cond, self.guidance, trajectory.uncond)
            with torch.no_grad(), self.trainer.reference():
                reference = adapter.predict(*args)
            total = total + (adapter.predict(*args) - reference).square().flatten(1).mean(1).sum()
        return total / k

    def step(self, step: int) -> dict[str, float]:
        from vialign.data import prompts_for_step
        from vialign.trainer import sample_seed

        trainer, settings, adapter = self.trainer, self.settings, self.trainer.adapter
        prompts = prompts_for_step(trainer.train_prompts, step, settings.prompts_per_step, self.config.seed)
        lo, hi = trainer.local_range(len(prompts))
        k = self.window(step)
        started = time.perf_counter()
        adapter.unwrapped_denoiser.train()
        scores, losses, kls = [], [], []
        with torch.no_grad():
            adapter.encode_prompt(prompts)  # the same text-encoder batches on every process
        for start in range(lo, hi, settings.micro_batch_size):
            end = min(start + settings.micro_batch_size, hi)
            batch_prompts = prompts[start:end]
            seeds = [sample_seed(self.config.seed, step, g) for g in range(start, end)]
            latents, trajectory = self._final_latents(batch_prompts, seeds, k, step)
            repeats = max(1, settings.lv_samples) if self.config.algorithm == "draft" else 1
            loss = torch.zeros((), device=adapter.device)
            for repeat in range(repeats):
                final = latents
                if settings.lv_samples and self.config.algorithm == "draft":
                    final = self._lv_final(trajectory, step, start, repeat)
                pixels = adapter.decode(final, checkpoint=settings.checkpoint)
                score = trainer.reward(pixels, batch_prompts).score
                if not torch.isfinite(score).all():
                    raise VialignInputError(
                        f"step {step}: the reward returned NaN or infinite scores; a gradient method cannot skip "
                        "them (check the reward's inputs, or lower optim.lr)"
                    )
                scores.append(score.detach())
                loss = loss + settings.loss_scale * self.transform(score).sum() / (len(prompts) * repeats)
            if settings.kl_coeff and trajectory is not None:
                kl = self._kl_term(trajectory, k)
                kls.append(kl.detach() / (end - start))
                loss = loss + settings.kl_coeff * kl / len(prompts)
            (loss * trainer.world_size).backward()
            losses.append(loss.detach())
        regularizer = None
        if self.regularizer is not None:
            regularizer = self.regularizer_loss(step, settings.micro_batch_size)
            (settings.regularizer_weight * regularizer).backward()
        trainer.average_gradients()
        grad_norm = trainer.optimizer_step(step)
        adapter.unwrapped_denoiser.eval()
        score = trainer.gather(torch.cat(scores).float())
        metrics = {
            "reward/mean": float(score.mean()),
            "reward/std": float(score.std(unbiased=False)) if score.numel() > 1 else 0.0,
            "loss": float(trainer.reduce(torch.stack(losses).sum())) / trainer.world_size,
            "grad_steps": k,
            "grad_norm": grad_norm,
            "time/train_s": time.perf_counter() - started,
        }
        if kls:
            metrics["kl"] = float(torch.stack(kls).mean())
        if regularizer is not None:
            metrics["regularizer_loss"] = float(regularizer)
        return metrics

    def _lv_final(self, trajectory, step: int, start: int, repeat: int) -> torch.Tensor:
        """DRaFT-LV: re-noise x_N to the last step's level and re-run that step with grad."""
        from vialign.sampling import evaluate_step
        from vialign.trainer import sample_seed

        adapter, last = self.trainer.adapter, self.num_steps - 1
        x_n = trajectory.latents[:, -1].detach()
        generator = torch.Generator().manual_seed(
            sample_seed(self.config.seed, step, 2**41 + start * 64 + repeat)
        )
        noise = torch.randn(x_n.shape, generator=generator).to(x_n.device)
        noisy = self.schedule.alphas[last] * x_n + self.schedule.sigmas[last] * noise
        return evaluate_step(
            adapter,
            self.schedule,
            self.sampler,
            last,
            noisy,
            trajectory.cond,
            guidance=self.guidance,
            uncond=trajectory.uncond,
            stochastic=False,
        ).x_next
