"""Training loops of the ShapeWorld testbed (CPU-sized): VAE, CLIP, denoisers, reward fine-tuning."""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rewards import shapeworld as sw
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize

Log = Callable[[str], None]


class BuildLog:
    """A build script's log: each message with the seconds since it started, to stdout and to a file."""

    def __init__(self, path: Any):
        self.start, self.file = time.time(), open(path, "w", encoding="utf-8")  # noqa: SIM115

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.0f} s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def build_parser(description: str, default_out: Path) -> argparse.ArgumentParser:
    """The options every testbed build takes: ``--out``, ``--quick``, ``--threads``, ``--report-only``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--report-only", action="store_true", help="only re-measure the saved models (README figures)"
    )
    return parser


def sample_batch(
    rng: np.random.Generator, scenes: list[sw.Scene], batch: int
) -> tuple[torch.Tensor, list[str]]:
    """Renders of ``batch`` random scenes (random seeds) and their prompts."""
    chosen = [scenes[i] for i in rng.integers(len(scenes), size=batch)]
    seeds = rng.integers(2**31, size=batch).tolist()
    return sw.render_batch(chosen, seeds), [s.prompt for s in chosen]


class EMA:
    """Exponential moving average of a module's parameters (evaluated and shipped instead of the raw ones)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].mul_(self.decay).add_(value, alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: Any = None) -> None:
    """Set the learning rate, backpropagate ``loss`` (clipping the gradient norm of ``clip`` at 1), step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()


def train_vae(
    steps: int, *, batch: int = 64, lr: float = 1e-3, kl_weight: float = 1e-5, seed: int = 0, log: Log = print
) -> Any:
    from vialign.testbed import components

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = components.vae().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scenes, start = sw.all_scenes(), time.time()
    for step in range(steps):
        pixels, _ = sample_batch(rng, scenes, batch)
        x = pixels * 2 - 1
        posterior = model.encode(x).latent_dist
        reconstruction = model.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + kl_weight * posterior.kl().mean()
        optimizer_step(optimizer, loss, lr * cosine_lr(step, steps))
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.5f}  {time.time() - start:6.0f} s")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def latent_statistics(model: Any, samples: int = 1024, seed: int = 1) -> tuple[float, float]:
    """Mean and std of the VAE's latents over renders: SD3's shift_factor and 1 / scaling_factor."""
    pixels, _ = sample_batch(np.random.default_rng(seed), sw.all_scenes(), samples)
    latents = model.encode(pixels * 2 - 1).latent_dist.mode()
    return float(latents.mean()), float(latents.std())


def _clip_inputs(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
    )


def clip_embeddings(model: Any, tokenizer: Any, pixels: torch.Tensor | None, prompts: list[str] | None):
    image = text = None
    if pixels is not None:
        # a video CLIP sees F frames stacked as 3F channels: the statistics repeat per frame
        repeat = pixels.shape[1] // 3
        pixel_values = normalize(pixels, OPENAI_CLIP_MEAN * repeat, OPENAI_CLIP_STD * repeat)
        out = model.get_image_features(pixel_values=pixel_values)
        image = F.normalize(getattr(out, "pooler_output", out), dim=-1)
    if prompts is not None:
        out = model.get_text_features(**_clip_inputs(tokenizer, prompts))
        text = F.normalize(getattr(out, "pooler_output", out), dim=-1)
    return image, text


def contrastive_loss(model: Any, tokenizer: Any, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE; samples sharing a prompt are all positives (soft targets)."""
    image, text = clip_embeddings(model, tokenizer, pixels, prompts)
    logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
    same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean()
    )


Batches = Callable[[np.random.Generator, int], tuple[torch.Tensor, list[str]]]


def image_renders(rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[str]]:
    """Renders of random scenes of all 144 prompts (the VAE's and the CLIP's data)."""
    return sample_batch(rng, sw.all_scenes(), batch)


def train_clip(
    tokenizer: Any,
    steps: int,
    *,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log: Log = print,
    model: Any = None,
    renders: Batches = image_renders,
):
    """Contrastive training of ``model`` (default: the image testbed's tiny CLIP) on ``renders``."""
    from vialign.testbed import components

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = (components.clip(len(tokenizer)) if model is None else model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start = time.time()
    for step in range(steps):
        pixels, prompts = renders(rng, batch)
        loss = contrastive_loss(model, tokenizer, pixels, prompts)
        optimizer_step(optimizer, loss, lr * cosine_lr(step, steps))
        if step % 200 == 0 or step == steps - 1:
            log(f"clip step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f} s")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def retrieval_accuracy(model: Any, tokenizer: Any, seeds: range = range(3), offset: int = 50_000) -> float:
    """Zero-shot: a clean render's best-matching prompt among all 144 is its own."""
    scenes = sw.all_scenes()
    prompts = [s.prompt for s in scenes]
    _, text = clip_embeddings(model, tokenizer, None, prompts)
    hits = total = 0
    for seed in seeds:
        pixels = sw.render_batch(scenes, [offset + 1000 * seed + i for i in range(len(scenes))])
        image, _ = clip_embeddings(model, tokenizer, pixels, None)
        hits += int(((image @ text.T).argmax(1) == torch.arange(len(scenes))).sum())
        total += len(scenes)
    return hits / total


def train_denoiser(
    adapter: Any,
    steps: int,
    *,
    batch: int = 128,
    lr: float = 5e-4,
    dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    evaluate: Callable[[int], dict] | None = None,
    eval_every: int = 250,
    log: Log = print,
    latents: Batches | None = None,
) -> tuple[list[dict], dict[int, dict]]:
    """Train ``adapter.denoiser`` on train-prompt renders: rectified flow with logit-normal sigma for
    flow models, epsilon prediction with uniform t for diffusion models; ``dropout`` of the prompts
    become the empty prompt (for classifier-free guidance). ``latents(rng, batch)`` gives the clean latents
    and their prompts (default: the image testbed's train-prompt renders, encoded). Returns the evaluation
    history and the EMA weights at every evaluation."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenes = [s for s in sw.all_scenes() if not s.held_out]

    def encoded_renders(rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[str]]:
        pixels, prompts = sample_batch(rng, scenes, batch)
        with torch.no_grad():
            return adapter.encode(pixels), prompts

    latents = latents or encoded_renders
    denoiser = adapter.denoiser
    denoiser.train().requires_grad_(True)
    ema = EMA(denoiser, ema_decay)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.0)
    history, snapshots, start = [], {}, time.time()
    empty = adapter.encode_prompt([""])
    for step in range(steps + 1):
        if evaluate is not None and step % eval_every == 0 and step > 0:
            live = copy.deepcopy(denoiser.state_dict())
            ema.copy_to(denoiser)
            denoiser.eval()
            metrics = {"step": step, "seconds": round(time.time() - start, 1), **evaluate(step)}
            history.append(metrics)
            snapshots[step] = copy.deepcopy(ema.shadow)
            log(
                f"{adapter.family} step {step:5d}  "
                + "  ".join(f"{k} {v}" for k, v in metrics.items() if k != "step")
            )
            denoiser.load_state_dict(live)
            denoiser.train()
        if step == steps:
            break
        x0, prompts = latents(rng, batch)
        keep = torch.rand(batch) >= dropout
        cond = adapter.encode_prompt(prompts)
        cond = type(cond)(
            {
                k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v, empty.tensors[k].expand_as(v))
                for k, v in cond.items()
            }
        )
        noise = torch.randn_like(x0)
        if adapter.kind == "flow":
            sigma = torch.sigmoid(torch.randn(batch))  # logit-normal (SD3 paper, sec. 3.1)
            s = sigma.view(-1, *[1] * (x0.ndim - 1))
            noisy, target, timesteps = (1 - s) * x0 + s * noise, noise - x0, sigma * 1000
        else:
            timesteps = torch.randint(0, adapter.scheduler.config.num_train_timesteps, (batch,))
            alpha, sigma = adapter.coefficients(timesteps)
            view = (-1, *[1] * (x0.ndim - 1))
            noisy, target = alpha.view(view) * x0 + sigma.view(view) * noise, noise
            timesteps = timesteps.float()
        loss = F.mse_loss(adapter.predict(noisy, timesteps, cond), target)
        optimizer_step(optimizer, loss, lr * cosine_lr(step, steps), clip=denoiser.parameters())
        ema.update(denoiser)
        if step % 200 == 0:
            log(f"{adapter.family} step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f} s")
    denoiser.eval().requires_grad_(False)
    return history, snapshots


def finetune_reward(
    model: Any,
    tokenizer: Any,
    pixels: torch.Tensor,
    prompts: list[str],
    labels: torch.Tensor,
    steps: int,
    *,
    batch: int = 128,
    lr: float = 3e-4,
    render_weight: float = 0.5,
    seed: int = 0,
    log: Log = print,
    renders: Batches = image_renders,
) -> tuple[Any, dict[str, float]]:
    """Teach the CLIP which *generated* samples are right: a logistic head ``a cos + b`` trained with
    binary cross-entropy on oracle labels (the stand-in for human raters), plus the contrastive loss on
    clean renders so that it keeps knowing the world. Returns the model and ``{"a", "b"}``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.train().requires_grad_(True)
    a = torch.nn.Parameter(torch.tensor(10.0))
    b = torch.nn.Parameter(torch.tensor(-5.0))
    optimizer = torch.optim.AdamW([*model.parameters(), a, b], lr=lr, weight_decay=0.01)
    start = time.time()
    positive_weight = float((1 - labels.float().mean()) / labels.float().mean().clamp(min=1e-3))
    for step in range(steps):
        index = torch.from_numpy(rng.integers(len(prompts), size=batch))
        image, text = clip_embeddings(model, tokenizer, pixels[index], [prompts[i] for i in index])
        logits = a * (image * text).sum(-1) + b
        weights = torch.where(labels[index].bool(), positive_weight, 1.0)  # balance correct / incorrect
        loss = F.binary_cross_entropy_with_logits(logits, labels[index].float(), weight=weights)
        render_pixels, render_prompts = renders(rng, batch)
        loss = loss + render_weight * contrastive_loss(model, tokenizer, render_pixels, render_prompts)
        optimizer_step(optimizer, loss, lr * cosine_lr(step, steps, warmup=50))
        if step % 100 == 0 or step == steps - 1:
            log(
                f"reward step {step:5d}  loss {loss.item():.4f}  a {a.item():.2f} b {b.item():.2f}  "
                f"{time.time() - start:6.0f} s"
            )
    return model.eval().requires_grad_(False), {"a": a.item(), "b": b.item()}
