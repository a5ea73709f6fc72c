"""Writing videos: MP4 through PyAV read back by ``read_video`` (frame count, size, frame rate, a measured
pixel error bound), lossless PNG frames read back exactly, clear errors for bad frames, and no file
left behind by a failure."""

from __future__ import annotations

import errno
from fractions import Fraction

import av
import pytest
import torch

import vialign.files
from rewards import shapeworld_video as sv
from vialign.errors import VialignInputError
from vialign.files import DiskWriteError
from vialign.media import read_image, read_video, write_frames, write_video

# Mean absolute error of an MP4 round trip on smooth content, in 1/255 (measured at crf 12: 2.15 with
# yuv420p, whose colour is stored at half resolution; 1.15 with yuv444p).
SMOOTH_MEAN_ERROR = {"yuv420p": 3.0, "yuv444p": 1.5}


def smooth(frames: int, height: int, width: int) -> torch.Tensor:
    """T x 3 x H x W: gradients and a slow wave drifting over time."""
    t = torch.arange(frames).view(-1, 1, 1, 1).float()
    y = torch.arange(height).view(1, 1, -1, 1).float() / height
    x = torch.arange(width).view(1, 1, 1, -1).float() / width
    red = 0.2 + 0.6 * x + 0.01 * t + 0 * y
    green = 0.3 + 0.5 * y + 0 * x + 0 * t
    blue = 0.5 + 0.3 * torch.sin(x * 1.6 + y * 1.6 + t / 4)
    return torch.cat([red, green, blue], dim=1).clamp(0, 1)


def quantised(frames: torch.Tensor) -> torch.Tensor:
    return (frames * 255).round() / 255


@pytest.mark.parametrize(
    "pixel_format,size,fps",
    [("yuv420p", (32, 48), 8), ("yuv444p", (32, 48), Fraction(30000, 1001)), ("yuv444p", (31, 33), 12.5)],
)
def test_mp4_round_trip(tmp_path, pixel_format, size, fps):
    frames = smooth(9, *size)
    path = tmp_path / "clip.mp4"
    write_video(frames, path, fps, pixel_format=pixel_format)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == pixel_format
        assert stream.average_rate == Fraction(fps) and stream.frames == 9
    back = read_video(path).transpose(0, 1)  # read_video gives 3 x T x H x W
    assert back.shape == frames.shape
    error = (back - quantised(frames)).abs()
    assert error.mean() * 255 < SMOOTH_MEAN_ERROR[pixel_format], float(error.mean() * 255)


def test_mp4_keeps_what_the_video_oracle_judges(tmp_path):
    scenes = [sv.VideoScene("red", "triangle", "left"), sv.VideoScene("blue", "circle", "still")]
    for scene, video in zip(scenes, sv.render_video_batch(scenes, [3, 4])):
        write_video(video, tmp_path / "v.mp4", 8)
        back = read_video(tmp_path / "v.mp4").permute(1, 2, 3, 0).numpy()  # F x H x W x 3
        assert all(sv.judge_video(back, scene.prompt).values())


def test_png_frames_round_trip_exactly(tmp_path):
    frames = torch.rand(11, 3, 7, 5)
    paths = write_frames(frames, tmp_path / "frames")
    assert [p.name for p in paths] == [f"frame_{i:03d}.png" for i in range(11)]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [p.name for p in paths]
    back = torch.stack([read_image(p) for p in paths])
    assert torch.equal(back, quantised(frames))


@pytest.mark.parametrize(
    "frames,message",
    [
        (torch.rand(4, 3, 8, 8) * 1.5, r"must lie in \[0, 1\], got values in"),
        (torch.rand(4, 3, 8, 8) - 0.5, r"must lie in \[0, 1\]"),
        (torch.full((4, 3, 8, 8), float("nan")), r"must lie in \[0, 1\]"),
        (torch.rand(3, 8, 8), r"must be T x 3 x H x W \(RGB frames\), got shape \(3, 8, 8\)"),
        (torch.rand(2, 4, 3, 8, 8), r"must be T x 3 x H x W"),
        (torch.rand(3, 9, 8, 8), r"needs \.transpose\(0, 1\)"),
        (torch.rand(4, 1, 8, 8), r"must be T x 3 x H x W"),
        (torch.zeros(0, 3, 8, 8), r"no frames"),
        (torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), r"must be floats in \[0, 1\]"),
        (torch.rand(4, 3, 8, 8).numpy(), r"must be a torch\.Tensor"),
    ],
)
def test_bad_frames_are_refused_and_nothing_is_written(tmp_path, frames, message):
    with pytest.raises(VialignInputError, match=message):
        write_video(frames, tmp_path / "v.mp4", 8)
    with pytest.raises(VialignInputError, match=message):
        write_frames(frames, tmp_path / "frames")
    assert list(tmp_path.iterdir()) == []


def test_bad_video_settings_are_refused(tmp_path):
    frames = torch.rand(4, 3, 8, 8)
    cases = [
        (dict(path=tmp_path / "v.webm"), "must end in .mp4"),
        (dict(fps=0), "fps must be a positive number"),
        (dict(fps=float("inf")), "fps must be a positive number"),
        (dict(crf=0), "crf must be an integer from 1"),
        (dict(pixel_format="rgb24"), "pixel_format must be one of yuv420p, yuv444p"),
        (dict(frames=torch.rand(4, 3, 8, 9)), r"even height and width, got 8 x 9.*pixel_format='yuv444p'"),
    ]
    for options, message in cases:
        arguments = {"frames": frames, "path": tmp_path / "v.mp4", "fps": 8, **options}
        with pytest.raises(VialignInputError, match=message):
            write_video(**arguments)
    assert list(tmp_path.iterdir()) == []


REAL_WRITE = vialign.files._write


def full_disk_after(monkeypatch, writes: int) -> None:
    """Every file write after the first ``writes`` fails as a full disk would."""
    real, count = REAL_WRITE, [0]

    def write(handle, data):
        count[0] += 1
        if count[0] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(vialign.files, "_write", write)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    old = tmp_path / "v.mp4"
    old.write_bytes(b"the previous video")
    full_disk_after(monkeypatch, 0)
    with pytest.raises(DiskWriteError, match="No space left on device; .*v.mp4 was not changed"):
        write_video(torch.rand(4, 3, 8, 8), old, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"] and old.read_bytes() == b"the previous video"

    full_disk_after(monkeypatch, 3)  # the 4th frame fails: a folder this call made is removed again
    with pytest.raises(DiskWriteError, match="frame_003.png"):
        write_frames(torch.rand(6, 3, 8, 8), tmp_path / "frames")
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]

    kept = tmp_path / "existing"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    full_disk_after(monkeypatch, 2)  # in a folder that was there: its frames go, the rest stays
    with pytest.raises(DiskWriteError):
        write_frames(torch.rand(6, 3, 8, 8), kept)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
