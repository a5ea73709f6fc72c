"""What every steering method shares: the sampling setup, candidate seeds, model-call counting, the
result type, and scoring of latents with a reward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.schedules import Schedule
from vialign.errors import VialignInputError
from vialign.media import reward_layout
from vialign.sampling import Sampler, StepHook, rollout_prompts
from vialign.seeds import mix_seed


@dataclass(frozen=True)
class SamplingSetup:
    """How plain sampling would run: every method starts from it (and N = 1 / lam = 0 / scale 0 gives
    back exactly these samples)."""

    schedule: Schedule
    height: int
    width: int
    guidance: Guidance = Guidance()
    sampler: Sampler = Sampler()
    negative_prompt: str | None = None

    @classmethod
    def for_adapter(
        cls,
        adapter: GeneratorAdapter,
        num_steps: int | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        sampler: Sampler = Sampler(),
        negative_prompt: str | None = None,
    ) -> SamplingSetup:
        default_height, default_width = adapter.default_size
        height, width = height or default_height, width or default_width
        schedule = adapter.schedule(num_steps or adapter.default_num_steps, height, width)
        sampler.check(schedule)
        return cls(schedule, height, width, adapter.make_guidance(guidance_scale), sampler, negative_prompt)


@dataclass
class SteeringResult:
    """One kept sample per prompt."""

    latents: torch.Tensor  # [P, *latent] the kept samples' final latents
    pixels: torch.Tensor  # [P, 3, H, W] in [0, 1]; video models: [P, F, 3, H, W], as adapter.decode
    reward: torch.Tensor  # [P] the steering reward of the kept samples
    model_calls: float  # denoiser evaluations (rows) per kept sample, recomputation included
    details: list[dict[str, Any]] = field(default_factory=list)  # per prompt: what the method chose


def candidate_seed(seed: int, j: int) -> int:
    """The seed of candidate / particle ``j`` of the image whose plain seed is ``seed``: the seed itself
    for j = 0 (plain sampling), else ``mix_seed(seed, j)`` (a CPU generator reads only 32 bits of a
    seed, so offsets such as ``seed + j * 2**32`` would repeat the same noise)."""
    return int(seed) if j == 0 else mix_seed(seed, j)


def check_prompts(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise VialignInputError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise VialignInputError("no prompts to sample")


@contextlib.contextmanager
def count_model_calls(adapter: GeneratorAdapter) -> Iterator[list[int]]:
    """Count the rows the denoiser evaluates inside the block (CFG's two halves count twice; a
    checkpointed step recomputed in the backward pass counts again): ``calls[0]``."""
    calls = [0]

    def pre_hook(module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        calls[0] += int(x.shape[0])

    handle = adapter.denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def sample_setup(
    adapter: GeneratorAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    setup: SamplingSetup,
    hook: StepHook | None = None,
) -> torch.Tensor:
    """Final latents of ``setup``'s sampling of ``prompts[i]`` from ``seeds[i]`` (with ``hook``), no grad."""
    with torch.no_grad():
        return rollout_prompts(
            adapter,
            list(prompts),
            list(seeds),
            setup.schedule,
            height=setup.height,
            width=setup.width,
            guidance=setup.guidance,
            negative_prompt=setup.negative_prompt,
            sampler=setup.sampler,
            hook=hook,
        ).final


def decode_and_score(
    adapter: GeneratorAdapter, reward, latents: torch.Tensor, prompts: Sequence[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, rewards) of ``latents``, ``batch_size`` at a time, no grad; NaN or inf is an error."""
    pixels, scores = [], []
    with torch.no_grad():
        for start in range(0, len(latents), batch_size):
            chunk = adapter.decode(latents[start : start + batch_size])
            pixels.append(chunk)
            scores.append(
                reward(reward_layout(chunk), list(prompts[start : start + batch_size])).score.float()
            )
    pixels, scores = torch.cat(pixels), torch.cat(scores)
    if not bool(torch.isfinite(scores).all()):
        raise VialignInputError(
            "the reward returned NaN or inf for a sample; check the reward and its inputs"
        )
    return pixels, scores


@contextlib.contextmanager
def frozen_weights(adapter: GeneratorAdapter) -> Iterator[None]:
    """Gradients w.r.t. latents only inside the block: no weight gradient is computed or kept."""
    trainable = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    trainable += [p for p in adapter.vae.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def score_latents(
    adapter: GeneratorAdapter,
    reward,
    latents: torch.Tensor,
    prompts: Sequence[str],
    *,
    checkpoint: bool = False,
) -> torch.Tensor:
    """The reward of decoded ``latents`` ([B]); differentiable when grad mode is on."""
    pixels = adapter.decode(latents, checkpoint=checkpoint)
    score = reward(reward_layout(pixels), list(prompts)).score.float()
    bad = ~torch.isfinite(score)
    if bool(bad.any()):
        raise VialignInputError(
            f"the reward returned NaN or inf for {int(bad.sum())} of {len(score)} samples (first: "
            f"{list(prompts)[int(bad.nonzero()[0])]!r}); check the reward's inputs and weights"
        )
    return score
