"""Reading images and videos from disk into reward inputs (float pixels in [0, 1]).

Images (PNG, JPEG, WebP, BMP) become ``3 x H x W``; videos (MP4, WebM, MOV, MKV, AVI through PyAV, and
animated GIFs through Pillow) become ``3 x T x H x W``. A file that cannot be decoded raises
:class:`MediaError` with the reason, so callers can report it and go on.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from vialign.errors import VialignInputError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif"}
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


class MediaError(Exception):
    """A file that is missing, unreadable or corrupt."""


def find_media(specs: list[str]) -> list[Path]:
    """Files named by ``specs``: folders (their media files, sorted, not recursive), glob patterns, or
    files. A spec that matches nothing is an error."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in MEDIA_EXTENSIONS and p.is_file())
            if not found:
                raise VialignInputError(
                    f"{spec} holds no image or video files ({', '.join(sorted(MEDIA_EXTENSIONS))})"
                )
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if Path(p).is_file())
            if not found:
                raise VialignInputError(f"no files match {spec}")
        elif path.is_file():
            found = [path]
        else:
            raise VialignInputError(f"no such file or folder: {spec}")
        files.extend(found)
    seen: set[Path] = set()
    return [p for p in files if not (p.resolve() in seen or seen.add(p.resolve()))]


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    # channels-first and contiguous before the float conversion: batching strided tensors is slow
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0))).float().div_(255)


def read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image.load()
            return _to_tensor(np.asarray(image.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f"cannot read image: {error}") from None


def _evenly(frames: list, max_frames: int) -> list:
    if len(frames) <= max_frames:
        return frames
    index = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    return [frames[i] for i in index]


def read_video(path: Path, max_frames: int = 64) -> torch.Tensor:
    """3 x T x H x W; videos longer than ``max_frames`` keep ``max_frames`` evenly spaced frames."""
    try:
        if path.suffix.lower() == ".gif":
            with Image.open(path) as image:
                frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
        else:
            import av

            with av.open(str(path)) as container:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except Exception as error:  # noqa: BLE001 - PyAV and Pillow raise many classes for a bad file
        raise MediaError(f"cannot read video: {error}") from None
    if not frames:
        raise MediaError("the video has no frames")
    return torch.stack([_to_tensor(frame) for frame in _evenly(frames, max_frames)], dim=1)


def read_media(path: Path, max_frames: int = 64) -> torch.Tensor:
    """3 x H x W for an image, 3 x T x H x W for a video (a one-frame GIF is an image)."""
    if not path.is_file():
        raise MediaError("file not found")
    if is_video(path):
        video = read_video(path, max_frames)
        return video[:, 0] if path.suffix.lower() == ".gif" and video.shape[1] == 1 else video
    return read_image(path)


def save_grid(pixels: torch.Tensor, path: str | os.PathLike, columns: int, scale: int = 2) -> None:
    """Images ``N x 3 x H x W`` in [0, 1] as one PNG, ``columns`` per row, 2 px white gaps, upscaled."""
    images = (
        (pixels.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    )
    rows = max(1, math.ceil(len(images) / columns))
    height, width = images.shape[1:3]
    grid = np.full((rows * (height + 2), columns * (width + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (height + 2) : r * (height + 2) + height, c * (width + 2) : c * (width + 2) + width] = image
    size = (grid.shape[1] * scale, grid.shape[0] * scale)
    Image.fromarray(grid).resize(size, Image.NEAREST).save(path)
