"""Video rewards: any image reward on sampled frames, and temporal consistency.

* :class:`FrameSampledReward` scores ``num_frames`` frames of each ``B x C x T x H x W`` video with an
  image reward and averages them (score and every dimension). Frame choices: ``uniform`` (evenly
  spaced, first and last included), ``first-middle-last``, ``random`` (one frame, from a seeded
  generator), ``all``. Images (4-d input) go straight to the image reward.
* :class:`TemporalConsistency`: mean cosine similarity of consecutive frames' CLIP image embeddings
  (1 = every frame looks the same to CLIP).
"""

from __future__ import annotations

import torch

from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.errors import RewardInputError

FRAME_MODES = ("uniform", "first-middle-last", "random", "all")


def frame_indices(
    num_available: int, mode: str, num_frames: int, generator: torch.Generator | None = None
) -> list[int]:
    """Which of ``num_available`` frames to score."""
    if num_available < 1:
        raise RewardInputError("the video has no frames")
    if mode == "all":
        return list(range(num_available))
    if mode == "first-middle-last":
        return sorted({0, (num_available - 1) // 2, num_available - 1})
    if mode == "random":
        return [int(torch.randint(num_available, (1,), generator=generator))]
    if mode == "uniform":
        if num_frames < 1:
            raise RewardInputError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames >= num_available:
            return list(range(num_available))
        return torch.linspace(0, num_available - 1, num_frames).round().long().tolist()
    raise RewardInputError(f"unknown frame sampling {mode!r}; choose one of {', '.join(FRAME_MODES)}")


class FrameSampledReward(Reward):
    """An image reward applied to sampled video frames, averaged per video."""

    def __init__(self, reward: Reward, frames: str = "uniform", num_frames: int = 8, seed: int = 0):
        super().__init__()
        if frames not in FRAME_MODES:
            raise RewardInputError(
                f"unknown frame sampling {frames!r}; choose one of {', '.join(FRAME_MODES)}"
            )
        self.reward, self.frames, self.num_frames = reward, frames, num_frames
        self.generator = torch.Generator().manual_seed(seed)
        inner = reward.info
        self.info = RewardInfo(
            name=inner.name,
            description=f"{inner.description}; videos: mean over {frames} frames",
            differentiable=inner.differentiable,
            modality="image+video",
            scale=inner.scale,
            typical_range=inner.typical_range,
            higher_is_better=inner.higher_is_better,
            default_checkpoint=inner.default_checkpoint,
            needs_prompt=inner.needs_prompt,
            judge=inner.judge,
        )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        if pixels.ndim == 4:
            return self.reward(pixels, prompts)
        batch = pixels.shape[0]
        index = frame_indices(pixels.shape[2], self.frames, self.num_frames, self.generator)
        frames = pixels[:, :, index].permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B * k, C, H, W]
        out = self.reward(frames, [p for p in prompts for _ in index])
        mean = lambda x: x.view(batch, len(index)).mean(1)  # noqa: E731
        return RewardOutput(mean(out.score), {name: mean(value) for name, value in out.dims.items()})


class TemporalConsistency(Reward):
    """Mean cosine similarity of consecutive frames' CLIP image embeddings."""

    info = RewardInfo(
        name="temporal-consistency",
        description="mean CLIP cosine similarity of consecutive video frames",
        differentiable=True,
        modality="video",
        scale="cosine in [-1, 1] (~0.8-1 for real videos)",
        typical_range=(0.8, 1.0),
        needs_prompt=False,
        default_checkpoint="openai/clip-vit-base-patch32",
    )

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        batch, _, length = pixels.shape[:3]
        if length < 2:
            raise RewardInputError("temporal-consistency needs videos of at least 2 frames")
        embeddings = self.encoder.embed_images(pixels.permute(0, 2, 1, 3, 4).flatten(0, 1)).view(
            batch, length, -1
        )
        return RewardOutput((embeddings[:, 1:] * embeddings[:, :-1]).sum(-1).mean(1))


def load_temporal_consistency(
    *, pretrained: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> TemporalConsistency:
    """CLIP image embeddings of a transformers CLIP model (default openai/clip-vit-base-patch32)."""
    from rewards.clip import HFCLIPEncoder

    encoder = HFCLIPEncoder.load(
        pretrained,
        default_id="openai/clip-vit-base-patch32",
        what="temporal-consistency",
        device=device,
        dtype=dtype,
        with_text=False,
    )
    return TemporalConsistency(encoder)
