"""Reading images and videos from disk into reward inputs (float pixels in [0, 1]), and writing videos.

Images (PNG, JPEG, WebP, BMP) become ``3 x H x W``; videos (MP4, WebM, MOV, MKV, AVI through PyAV, and
animated GIFs through Pillow) become ``3 x T x H x W``. A file that cannot be decoded raises
:class:`MediaError` with the reason, so callers can report it and go on.

Videos are written from a stack of frames ``T x 3 x H x W`` in [0, 1] (``read_video(path).transpose(0, 1)``
gives them back): :func:`write_video` as H.264 MP4 (lossy, to watch), :func:`write_frames` as one lossless
PNG per frame (exact, to compute on). Both write through temporary names and renames
(:func:`vialign.files.write_atomically`), so a failure leaves no partial file behind.
"""

from __future__ import annotations

import glob
import io
import math
import numbers
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from vialign.errors import VialignInputError
from vialign.files import disk_error, write_atomically

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


def _to_tensor(array: np.ndarray, uint8: bool = False) -> torch.Tensor:
    # channels-first and contiguous before the float conversion: batching strided tensors is slow
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 0)))
    return tensor if uint8 else to_unit_range(tensor)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1] (what the readers return without ``uint8=True``), on their device."""
    return pixels.float().div_(255)


def read_image(path: Path, uint8: bool = False) -> torch.Tensor:
    """3 x H x W in [0, 1] (float32), or its uint8 values with ``uint8=True`` (see :func:`to_unit_range`)."""
    try:
        with Image.open(path) as image:
            image.load()
            return _to_tensor(np.asarray(image.convert("RGB")), uint8)
    except (OSError, ValueError, SyntaxError) as error:
        raise MediaError(f"cannot read image: {error}") from None


def _evenly(frames: list, max_frames: int) -> list:
    if len(frames) <= max_frames:
        return frames
    index = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
    return [frames[i] for i in index]


def read_video(path: Path, max_frames: int = 64, uint8: bool = False) -> torch.Tensor:
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
    return torch.stack([_to_tensor(frame, uint8) for frame in _evenly(frames, max_frames)], dim=1)


def read_media(path: Path, max_frames: int = 64, uint8: bool = False) -> torch.Tensor:
    """3 x H x W for an image, 3 x T x H x W for a video (a one-frame GIF is an image); in [0, 1], or
    uint8 with ``uint8=True``."""
    if not path.is_file():
        raise MediaError("file not found")
    if is_video(path):
        video = read_video(path, max_frames, uint8)
        return video[:, 0] if path.suffix.lower() == ".gif" and video.shape[1] == 1 else video
    return read_image(path, uint8)


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


# ------------------------------------------------------------------------------------------- writing
VIDEO_PIXEL_FORMATS = ("yuv420p", "yuv444p")


def _frames_to_uint8(frames: torch.Tensor, what: str) -> np.ndarray:
    """``T x 3 x H x W`` floats in [0, 1] -> ``T x H x W x 3`` uint8 (rounded like ``vialign sample``'s
    PNGs); anything else is a :class:`VialignInputError` saying what is wrong."""
    if not isinstance(frames, torch.Tensor):
        raise VialignInputError(f"{what}: frames must be a torch.Tensor, got {type(frames).__name__}")
    if not frames.is_floating_point():
        raise VialignInputError(
            f"{what}: frames must be floats in [0, 1], got dtype {frames.dtype} (divide uint8 frames by 255)"
        )
    if frames.ndim != 4 or frames.shape[1] != 3:
        hint = (
            " (a 3 x T x H x W video, as read_video returns and rewards take, needs .transpose(0, 1))"
            if frames.ndim == 4 and frames.shape[0] == 3
            else ""
        )
        raise VialignInputError(
            f"{what}: frames must be T x 3 x H x W (RGB frames), got shape {tuple(frames.shape)}{hint}"
        )
    if min(frames.shape) < 1:
        raise VialignInputError(f"{what}: no frames or empty frames, shape {tuple(frames.shape)}")
    with torch.no_grad():
        low, high = float(frames.min()), float(frames.max())
    if not (low >= 0.0 and high <= 1.0):  # also catches NaN
        raise VialignInputError(
            f"{what}: frames must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
            "(frames in [-1, 1] need x / 2 + 0.5, then .clamp(0, 1))"
        )
    return (frames.detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


def _encoder_frame(image: np.ndarray, pixel_format: str):
    """``image`` (``H x W x 3`` uint8) converted to ``pixel_format`` in a frame whose every byte is set.
    The conversion (swscale) leaves the padding at the end of each row uninitialized, and x264 reads some
    of it when a plane's rows are narrower than its SIMD loads (e.g. the 8-pixel chroma rows of a 16-wide
    yuv420p video): the same frames then encoded to different bytes from run to run."""
    import av

    converted = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pixel_format)
    frame = av.VideoFrame(converted.width, converted.height, pixel_format)
    for source, target in zip(converted.planes, frame.planes):
        rows = np.frombuffer(source, np.uint8)[: source.line_size * source.height]
        rows = rows.reshape(source.height, source.line_size)[:, : target.width]
        buffer = np.zeros(target.buffer_size, np.uint8)
        buffer[: target.line_size * target.height].reshape(target.height, target.line_size)[
            :, : target.width
        ] = rows
        target.update(buffer)
    return frame


def write_video(
    frames: torch.Tensor,
    path: str | os.PathLike,
    fps: float = 8,
    *,
    crf: int = 12,
    pixel_format: str = "yuv420p",
) -> None:
    """Write ``frames`` (``T x 3 x H x W`` floats in [0, 1]) as an H.264 MP4 at ``fps`` frames a second.

    MP4 is lossy: the file is for watching; write :func:`write_frames` too when the pixels matter.
    ``crf`` (1-51, lower is better; 0, lossless, is refused because few players decode it) defaults to
    12, visually transparent; the size of these files is small either way. ``pixel_format``:
    ``yuv420p`` (default) plays everywhere (browsers, QuickTime) but stores colour at half resolution and
    needs even H and W (odd sizes are an error: crop or pad the frames, or use ``yuv444p``); ``yuv444p``
    keeps full-resolution colour and accepts any size, but browsers and QuickTime do not play it (VLC,
    ffmpeg and :func:`read_video` do). Measured round trips through :func:`read_video` at crf 12 (mean
    absolute error, in 1/255): smooth gradients 32-64 px wide 1.6-2.2 with yuv420p, 1.1 with yuv444p;
    the ShapeWorld videos (32 x 32, sharp saturated edges) 2.2 (worst video 3.2; colour bleeds over
    2 px, a single edge pixel up to ~130) with yuv420p, 0.5 with yuv444p. Lower crf barely helps
    yuv420p: its error is mostly the halved colour resolution.

    The file is encoded in memory and written through a temporary name and a rename: a failure leaves
    ``path`` as it was."""
    what = f"write_video({os.fspath(path)})"
    if Path(path).suffix.lower() != ".mp4":
        raise VialignInputError(f"{what}: the file name must end in .mp4")
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise VialignInputError(f"{what}: fps must be a positive number, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 1 <= crf <= 51:
        raise VialignInputError(f"{what}: crf must be an integer from 1 (best) to 51, got {crf!r}")
    if pixel_format not in VIDEO_PIXEL_FORMATS:
        raise VialignInputError(
            f"{what}: pixel_format must be one of {', '.join(VIDEO_PIXEL_FORMATS)}, got {pixel_format!r}"
        )
    images = _frames_to_uint8(frames, what)
    height, width = images.shape[1:3]
    if pixel_format == "yuv420p" and (height % 2 or width % 2):
        raise VialignInputError(
            f"{what}: H.264 in yuv420p needs an even height and width, got {height} x {width}: crop or pad "
            "the frames, or pass pixel_format='yuv444p' (any size; browsers do not play it)"
        )
    import av

    buffer = io.BytesIO()
    try:
        with av.open(buffer, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
            stream.options = {"crf": str(crf), "preset": "medium"}
            for image in images:
                container.mux(stream.encode(_encoder_frame(image, pixel_format)))
            container.mux(stream.encode())  # flush the encoder's delayed frames
    except av.FFmpegError as error:
        raise VialignInputError(f"{what}: could not encode the video: {error}") from None
    write_atomically(path, buffer.getvalue(), kept=f"{os.fspath(path)} was not changed")


def write_frames(frames: torch.Tensor, folder: str | os.PathLike) -> list[Path]:
    """Write ``frames`` (``T x 3 x H x W`` floats in [0, 1]) as lossless PNGs ``frame_000.png``,
    ``frame_001.png``, ... in ``folder`` (made if missing; as many digits as the count needs, at least 3);
    returns their paths. Reading them back gives the frames rounded to 1/255, exactly.

    Every frame is encoded before anything is written, and each file is written through a temporary
    name and a rename; if a write fails, the frames this call already wrote are removed (and ``folder``
    when this call made it), so a failure leaves no partial set behind. Other files in ``folder``
    are left alone (an older ``frame_*.png`` that this call overwrote is gone, though)."""
    folder = Path(folder)
    images = _frames_to_uint8(frames, f"write_frames({folder})")
    digits = max(3, len(str(len(images) - 1)))
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    made_folder = not folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise disk_error(folder, error, "no frames were written") from error
    written: list[Path] = []
    try:
        for index, data in enumerate(encoded):
            path = folder / f"frame_{index:0{digits}d}.png"
            write_atomically(path, data, kept="no frames were kept")
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if made_folder:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return written


def reward_layout(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in the layout rewards take: a video model's ``B x F x 3 x H x W`` (the adapter's
    ``decode``) becomes ``B x 3 x F x H x W`` (``rewards.base``); images ``B x 3 x H x W`` pass unchanged.
    Training (``VideoPixelsReward``) and steering convert here, once."""
    return pixels.transpose(1, 2) if pixels.ndim == 5 else pixels
