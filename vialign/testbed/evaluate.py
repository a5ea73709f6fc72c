"""Measuring a generator on ShapeWorld: oracle accuracy (overall and per attribute), reward means,
best-of-N selection and two diversity measures (CLIP embeddings, pixels). Used by the training script, ``vialign eval`` and tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rewards import shapeworld as sw
from vialign.sample import generate_images
from vialign.sampling import Sampler


@dataclass
class Samples:
    pixels: torch.Tensor  # [N, 3, H, W] in [0, 1]; videos [N, F, 3, H, W]
    prompts: list[str]
    seeds: list[int]


def generate(
    adapter,
    prompts: Sequence[str],
    seeds_per_prompt: Sequence[int],
    *,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    sampler: Sampler = Sampler(),
    batch_size: int = 256,
    size: int = sw.IMAGE_SIZE,
) -> Samples:
    """Every prompt at every seed (prompt-major order), ODE by default."""
    all_prompts = [p for p in prompts for _ in seeds_per_prompt]
    all_seeds = [int(s) for _ in prompts for s in seeds_per_prompt]
    batches = generate_images(
        adapter,
        all_prompts,
        all_seeds,
        num_steps=num_steps,
        height=size,
        width=size,
        guidance=adapter.make_guidance(guidance_scale),
        sampler=sampler,
        batch_size=batch_size,
    )
    parts = [pixels.cpu() for _, pixels in batches]
    return Samples(torch.cat(parts), all_prompts, all_seeds)


@dataclass
class OracleReport:
    accuracy: float
    per_attribute: dict[str, float]
    correct: torch.Tensor = field(repr=False)  # [N] bool, every attribute right
    verdicts: dict[str, torch.Tensor] = field(repr=False)  # attribute -> [N] bool


def oracle_report(samples: Samples) -> OracleReport:
    """The ShapeWorld oracle's verdicts on images, or the ShapeWorld video oracle's on videos."""
    if samples.pixels.ndim == 5:
        from rewards import shapeworld_video as swv

        videos = samples.pixels.permute(0, 1, 3, 4, 2).numpy()
        verdicts = [swv.judge_video(video, prompt) for video, prompt in zip(videos, samples.prompts)]
        attributes = swv.ATTRIBUTES
    else:
        images = samples.pixels.permute(0, 2, 3, 1).numpy()
        verdicts = [sw.judge(image, prompt) for image, prompt in zip(images, samples.prompts)]
        attributes = sw.ATTRIBUTES
    correct = torch.tensor([all(v.values()) for v in verdicts])
    by_attribute = {a: torch.tensor([v[a] for v in verdicts]) for a in attributes}
    per_attribute = {a: float(right.float().mean()) for a, right in by_attribute.items()}
    return OracleReport(float(correct.float().mean()), per_attribute, correct, by_attribute)


def split_accuracies(
    adapter, held_out: Sequence[str], train_prompts: Sequence[str], seeds: Sequence[int], size: int
) -> dict:
    """A build's checkpoint figures: oracle accuracy on held-out and pretraining prompts, held-out per
    attribute (rounded as ``metrics.json`` stores them)."""
    held = oracle_report(generate(adapter, held_out, seeds, size=size))
    seen = oracle_report(generate(adapter, train_prompts, seeds, size=size))
    return {
        "held_out_accuracy": round(held.accuracy, 4),
        "train_accuracy": round(seen.accuracy, 4),
        "held_out_per_attribute": {k: round(v, 4) for k, v in held.per_attribute.items()},
    }


def pick_snapshot(history: list[dict], headroom: tuple[float, float], log, what: str = "") -> dict:
    """The checkpoint a build ships: of those whose held-out accuracy is inside ``headroom``, the best on
    the pretraining prompts (the later on ties); with none inside, the one closest to 45% (and a warning)."""
    inside = [h for h in history if headroom[0] <= h["held_out_accuracy"] <= headroom[1]]
    if inside:
        return max(inside, key=lambda h: (h["train_accuracy"], h["step"]))
    chosen = min(history, key=lambda h: abs(h["held_out_accuracy"] - 0.45))
    log(f"WARNING: no {what}checkpoint had held-out accuracy in {headroom}; shipping step {chosen['step']}")
    return chosen


def mean_and_se(values: torch.Tensor, per_prompt: int) -> tuple[float, float]:
    """Mean of per-sample values (prompt-major, ``per_prompt`` seeds each) and its standard error over
    seeds with the prompts held fixed: sqrt(sum_p var_p / S) / P, var_p the sample variance of prompt p's
    S values. This is how far the mean moves when the same prompts are drawn at other seeds; with one seed
    per prompt it falls back to the plain sqrt(var / N)."""
    values = values.detach().double().flatten()
    if per_prompt < 2:
        se = values.std() / math.sqrt(len(values)) if len(values) > 1 else torch.tensor(0.0)
        return float(values.mean()), float(se)
    grouped = values.view(-1, per_prompt)
    variance = grouped.var(dim=1)  # unbiased, per prompt
    se = variance.sum().div(per_prompt).sqrt() / grouped.shape[0]
    return float(values.mean()), float(se)


def best_of_n(scores: torch.Tensor, correct: torch.Tensor, n: int) -> float:
    """Oracle accuracy when, of each consecutive group of ``n`` samples (one prompt), the highest-scoring
    sample is kept."""
    groups = scores.view(-1, n).argmax(dim=1)
    return float(correct.view(-1, n)[torch.arange(len(groups)), groups].float().mean())


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (probability that a random positive outscores a random negative; ties 1/2)."""
    positive, negative = scores[labels.bool()], scores[~labels.bool()]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).float().mean()
    ties = (positive[:, None] == negative[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def embedding_diversity(embeddings: torch.Tensor, group: int) -> float:
    """Mean pairwise cosine distance of L2-normalised embeddings within each group of ``group`` samples."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1).view(-1, group, embeddings.shape[-1])
    similarity = e @ e.transpose(1, 2)
    off_diagonal = ~torch.eye(group, dtype=torch.bool)
    return float((1 - similarity[:, off_diagonal]).mean())


def pixel_diversity(pixels: torch.Tensor, group: int) -> float:
    """Mean pairwise RMS pixel distance between the images of one prompt (consecutive groups of
    ``group``), averaged over prompts: 0 when every seed gives the same image."""
    flat = pixels.flatten(1).float().view(-1, group, pixels[0].numel())
    distances = torch.cdist(flat, flat) / math.sqrt(pixels[0].numel())
    pairs = group * (group - 1)
    return float(distances.sum((1, 2)).div(pairs).mean())
