"""Image preprocessing in torch only, reproducing each reward model's official (PIL) pipeline so that
scores match and gradients reach the pixels.

The geometry (output sizes, crop offsets, padding) follows the official code exactly; resampling uses
antialiased bicubic interpolation, which is what torchvision applies to tensors and is designed to
match PIL's. The remaining difference to the official path is PIL's uint8 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(pixels: torch.Tensor, size: tuple[int, int], *, mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of B x C x H x W to ``size = (height, width)``; clamped to [0, 1] as the
    official uint8 path saturates."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    out = F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)
    return out.clamp(0, 1)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size of "resize the shortest side to ``size``" (torchvision and transformers agree:
    the long side is ``int(size * long / short)``)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shortest_side(pixels: torch.Tensor, size: int) -> torch.Tensor:
    return resize(pixels, shortest_side_size(pixels.shape[-2], pixels.shape[-1], size))


def center_crop(pixels: torch.Tensor, size: tuple[int, int], *, offsets: str = "round") -> torch.Tensor:
    """Crop the centre ``size``. ``offsets="round"`` is torchvision's ``int(round(d / 2))`` (open_clip);
    ``"floor"`` is transformers' ``int(d / 2)``."""
    height, width = pixels.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        raise ValueError(f"cannot crop {size} from an image of {(height, width)}")
    if offsets == "round":
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    else:
        top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return pixels[..., top : top + crop_h, left : left + crop_w]


def resize_longest_side_and_pad(pixels: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPSv2's evaluation transform: scale so the longest side is ``size`` (sides rounded with Python's
    ``round``), then pad to ``size x size`` with ``fill``, the extra pixel going right/bottom."""
    height, width = pixels.shape[-2:]
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    out = resize(pixels, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        out = F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return out


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


def clip_preprocess(
    pixels: torch.Tensor,
    size: int = 224,
    *,
    offsets: str = "round",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """CLIP's evaluation transform: shortest side to ``size`` (bicubic), centre crop, normalise."""
    pixels = resize_shortest_side(pixels.float(), size)
    return normalize(center_crop(pixels, (size, size), offsets=offsets), mean, std)
