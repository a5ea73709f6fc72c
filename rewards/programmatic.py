"""Programmatic rewards: no model, closed-form functions of the pixels.

* ``brightness``: mean of the Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` (0..1). Differentiable.
* ``saturation``: mean HSV saturation ``(max - min) / max`` over RGB (0..1). Differentiable (almost
  everywhere; a small epsilon keeps black pixels finite).
* ``colorfulness``: Hasler & Suesstrunk (2003) ``sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2)`` with
  rg = R - G and yb = (R + G) / 2 - B, on 0..255 pixel values (as the paper). Differentiable.
* ``jpeg-compressibility`` / ``jpeg-incompressibility``: minus / plus the size in kB of the image saved
  as JPEG at quality 95 (DDPO, Black et al. 2023). Not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward, RewardInfo, RewardOutput

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
JPEG_QUALITY = 95  # DDPO's jpeg_compressibility setting


def _frames(pixels: torch.Tensor) -> torch.Tensor:
    """B x C x H x W, or B x C x T x H x W flattened to B x C x (T*H) x W: these rewards are per-pixel means."""
    return pixels if pixels.ndim == 4 else pixels.flatten(2, 3)


class Brightness(Reward):
    info = RewardInfo(
        name="brightness",
        description="mean luma (Rec. 601)",
        differentiable=True,
        modality="image+video",
        scale="mean of 0.299 R + 0.587 G + 0.114 B",
        typical_range=(0.0, 1.0),
        needs_prompt=False,
    )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return RewardOutput((_frames(pixels) * weights).sum(1).flatten(1).mean(1))


class Saturation(Reward):
    info = RewardInfo(
        name="saturation",
        description="mean HSV saturation",
        differentiable=True,
        modality="image+video",
        scale="mean of (max - min) / max over RGB",
        typical_range=(0.0, 1.0),
        needs_prompt=False,
    )

    EPS = 1e-6  # keeps (max - min) / max finite on black pixels

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        frames = _frames(pixels)
        high, low = frames.amax(1), frames.amin(1)
        return RewardOutput(((high - low) / (high + self.EPS)).flatten(1).mean(1))


class Colorfulness(Reward):
    info = RewardInfo(
        name="colorfulness",
        description="Hasler & Suesstrunk (2003) colourfulness",
        differentiable=True,
        modality="image+video",
        scale="sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2) on 0..255 values",
        typical_range=(0.0, 150.0),
        needs_prompt=False,
    )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        frames = _frames(pixels) * 255
        red, green, blue = frames[:, 0].flatten(1), frames[:, 1].flatten(1), frames[:, 2].flatten(1)
        rg, yb = red - green, 0.5 * (red + green) - blue
        spread = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-12)
        centre = torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2 + 1e-12)
        return RewardOutput(spread + 0.3 * centre)


def jpeg_size_kb(image: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JPEGSize(Reward):
    """Size of the JPEG encoding; ``sign=-1`` is compressibility (smaller is better), +1 incompressibility."""

    def __init__(self, sign: int):
        super().__init__()
        self.sign = sign
        kind = "compressibility" if sign < 0 else "incompressibility"
        self.info = RewardInfo(
            name=f"jpeg-{kind}",
            description=f"JPEG {kind} (DDPO): {'-' if sign < 0 else '+'}size in kB at quality 95",
            differentiable=False,
            modality="image+video",
            scale=f"{'-' if sign < 0 else '+'}kB of JPEG (quality 95)",
            typical_range=(-150.0, 0.0) if sign < 0 else (0.0, 150.0),
            needs_prompt=False,
        )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        images = (
            (_frames(pixels).detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255)
            .round()
            .astype(np.uint8)
        )
        sizes = torch.tensor(
            [jpeg_size_kb(image) for image in images], dtype=torch.float32, device=pixels.device
        )
        return RewardOutput(self.sign * sizes)
