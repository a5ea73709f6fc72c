"""ShapeWorld video: one coloured shape moving left, moving right or staying still, its prompts, and a
rule-based oracle. The video counterpart of :mod:`rewards.shapeworld` (same colours, shapes, renderer
style and frame reader).

The world (deterministic by seed): 4 colours x 3 shapes x 3 motions = 36 prompts such as
``"a red circle moving left"`` or ``"a blue square staying still"``; every video is ``NUM_FRAMES`` (9)
frames of ``FRAME_SIZE`` x ``FRAME_SIZE`` (32 x 32) pixels. Per seed: background grey level, colour
jitter, shape size (``HALF_EXTENT``, +-7%), height, start position and speed (1.0-1.5 px a
frame, so 8-12 px over the video); the whole shape stays at least ``MARGIN`` px inside every frame.
Layouts: :func:`render_video` gives ``F x H x W x 3`` numpy (like the image testbed's ``render``),
:func:`render_video_batch` ``B x F x 3 x H x W`` (the video generators' pixels), and the reward takes
``B x 3 x F x H x W`` (every reward's video layout, ``rewards.base``).

Split (``PROMPT_SETS``; the same roles as the image testbed's):

* ``held_out`` (12): the triples whose indices sum to a multiple of 3, ``(c + s + m) % 3 == 0`` over
  ``COLOURS_USED``, ``SHAPES_USED``, ``MOTIONS`` (listed in ``HELD_OUT``). This is a Latin-square cut:
  each (colour, shape) pair loses exactly one of its 3 motions, each (shape, motion) pair loses 1 or 2
  of its 4 colours, each (colour, motion) pair loses exactly one of its 3 shapes. So every colour, shape
  and motion, and every *pair* of them, is still seen in pretraining; only the triples are new, which
  is what makes them a composition test rather than a vocabulary test.
* ``train`` (24): every other triple, the generator's pretraining prompts.
* ``eval`` (6, ``EVAL``): half of the held-out triples, two per motion and two per shape, what
  alignment is judged on and never trains on; ``align`` (30): every other prompt (the train triples and
  the other six held-out ones); ``all`` (36).

The oracle (:func:`read_video`, :func:`judge_video`): each frame is read by the image testbed's reader
(:func:`rewards.shapeworld.read_image`) for colour and shape, and the video's colour / shape is the value
shown in more than half of the frames (otherwise it reads "mixed"). Motion comes from the track of
the blob's centroid (background-distance weighted, over the image reader's foreground blob): a
least-squares line x(frame) fitted to the frames where a blob was found gives the total displacement
``slope * (F - 1)``. ``|displacement| < STILL_PX`` (3 px) reads "still", otherwise the sign gives left
or right; a track whose RMS distance from its line exceeds ``ERRATIC_PX`` (1.5 px), or with a blob in
half of the frames or fewer, reads "erratic" / "none" and matches no motion. Clean renders move 0 px
(still) or 8-12 px and their centroids sit within ~0.1 px of the line, so the thresholds leave wide
margins. Like the image oracle it is the testbed's held-out judge, never a training reward.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from rewards import shapeworld as sw
from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.errors import DamagedCheckpointError, RewardInputError

COLOURS_USED = ("red", "green", "blue", "yellow")  # the image testbed's colours furthest apart
SHAPES_USED = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "still")
MOTION_PHRASES = {"left": "moving left", "right": "moving right", "still": "staying still"}
ATTRIBUTES = ("colour", "shape", "motion")
NUM_FRAMES = 9
FRAME_SIZE = 32
# the shape's half-extent as a fraction of the side (jittered +-7%): a little above the image testbed's
# "small" (0.16), at which the image reader takes 1-4% of circles for crosses; 0.18 leaves room to move
HALF_EXTENT = 0.18
SPEED_PX = (1.0, 1.5)  # pixels a frame for the moving motions
MARGIN = 1.0  # pixels between the shape's bounding box and the frame's edge, in every frame
STILL_PX = 3.0  # |fitted total displacement| below this reads "still"
ERRATIC_PX = 1.5  # RMS distance of the centroid track from its fitted line above this reads "erratic"


@dataclass(frozen=True)
class VideoScene:
    colour: str
    shape: str
    motion: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} {MOTION_PHRASES[self.motion]}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape, self.motion) in HELD_OUT


def all_scenes() -> list[VideoScene]:
    return [VideoScene(c, s, m) for c in COLOURS_USED for s in SHAPES_USED for m in MOTIONS]


HELD_OUT = frozenset(
    (c, s, m)
    for i, c in enumerate(COLOURS_USED)
    for j, s in enumerate(SHAPES_USED)
    for k, m in enumerate(MOTIONS)
    if (i + j + k) % 3 == 0
)
# half of the held-out triples: each motion and each shape twice, every colour at least once
EVAL = frozenset(
    {
        ("red", "circle", "left"),
        ("green", "triangle", "left"),
        ("blue", "circle", "right"),
        ("yellow", "triangle", "right"),
        ("red", "square", "still"),
        ("yellow", "square", "still"),
    }
)


def _triple(scene: VideoScene) -> tuple[str, str, str]:
    return (scene.colour, scene.shape, scene.motion)


def train_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if not scene.held_out]


def held_out_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if scene.held_out]


def eval_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if _triple(scene) in EVAL]


def align_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if _triple(scene) not in EVAL]


PROMPT_SETS = {
    "train": train_prompts,
    "held_out": held_out_prompts,
    "all": lambda: [scene.prompt for scene in all_scenes()],
    "eval": eval_prompts,
    "align": align_prompts,
}

PROMPT_PATTERN = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) (?P<motion>moving left|moving right|staying still)$"
)


def parse_prompt(prompt: str) -> VideoScene:
    """The scene a prompt describes; a prompt outside the world is an error."""
    match = PROMPT_PATTERN.match(prompt.strip().lower())
    if match is None or match["colour"] not in COLOURS_USED or match["shape"] not in SHAPES_USED:
        raise RewardInputError(
            f"{prompt!r} is not a ShapeWorld video prompt ('a <{'|'.join(COLOURS_USED)}> "
            f"<{'|'.join(SHAPES_USED)}> <moving left|moving right|staying still>')"
        )
    motion = {phrase: m for m, phrase in MOTION_PHRASES.items()}[match["motion"]]
    return VideoScene(match["colour"], match["shape"], motion)


# ---------------------------------------------------------------------------------------------- render
def centre_track(scene: VideoScene, seed: int, size: int = FRAME_SIZE) -> tuple[np.ndarray, float, float]:
    """The shape's horizontal centre in each frame, its height and half-extent (pixels), for ``seed``."""
    rng = np.random.default_rng([seed, 1])  # independent of the appearance draws in render_video
    half = HALF_EXTENT * size * rng.uniform(0.93, 1.07)
    low, high = MARGIN + half, size - MARGIN - half  # allowed centres
    cy = size / 2 + rng.uniform(-2.5, 2.5)
    direction = {"left": -1.0, "right": 1.0, "still": 0.0}[scene.motion]
    travel = direction * rng.uniform(*SPEED_PX) * (NUM_FRAMES - 1)
    start = rng.uniform(low - min(travel, 0.0), high - max(travel, 0.0))
    return start + travel * np.arange(NUM_FRAMES) / (NUM_FRAMES - 1), cy, half


def render_video(scene: VideoScene, seed: int, size: int = FRAME_SIZE, supersample: int = 4) -> np.ndarray:
    """F x H x W x 3 float32 video in [0, 1] (the image testbed's ``render`` layout, one per frame),
    antialiased by supersampling."""
    rng = np.random.default_rng([seed, 0])
    background = np.full(3, rng.uniform(0.08, 0.30), dtype=np.float32)
    colour = np.clip(np.array(sw.COLOURS[scene.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    xs_track, cy, half = centre_track(scene, seed, size)
    fine = size * supersample
    coords = (np.arange(fine) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    frames = []
    for cx in xs_track:
        inside = sw.shape_mask(scene.shape, xs - cx, ys - cy, half).astype(np.float32)
        coverage = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
        frames.append(background * (1 - coverage) + colour * coverage)
    return np.stack(frames).astype(np.float32)


def render_video_batch(scenes: list[VideoScene], seeds: list[int], size: int = FRAME_SIZE) -> torch.Tensor:
    """B x F x 3 x H x W float tensor of renders in [0, 1]: the video generators' pixel layout (what
    ``vialign.media.write_video`` takes per video). Rewards take videos channels first, B x 3 x F x H x W:
    ``.transpose(1, 2)`` before scoring them."""
    videos = np.stack([render_video(s, seed, size) for s, seed in zip(scenes, seeds)])
    return torch.from_numpy(videos).permute(0, 1, 4, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------- oracle
def blob_centroid(image: np.ndarray) -> tuple[float, float] | None:
    """(x, y) centre of the main blob of an H x W x 3 image in [0, 1], weighted by each pixel's distance
    from the background (sub-pixel for antialiased edges); None when there is no blob. The blob is the
    one :func:`rewards.shapeworld.read_image` reads: background from the border median, the largest
    component of pixels further from it than half the peak distance, here widened by one pixel so the
    antialiased rim counts."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    distance = np.linalg.norm(image - np.median(border, axis=0), axis=-1)
    peak = sw._box_filter(distance).max()
    if peak < 0.1:
        return None
    blob = sw._largest_component(distance > 0.5 * peak)
    padded = np.pad(blob, 1)
    rim = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    weight = np.where(rim, distance, 0.0)
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    total = weight.sum()
    return float((weight * (xs + 0.5)).sum() / total), float((weight * (ys + 0.5)).sum() / total)


@dataclass(frozen=True)
class VideoReading:
    """What the oracle sees in one video."""

    colour: str
    shape: str
    motion: str
    displacement: float  # fitted total horizontal displacement in pixels (nan without a track)
    residual: float  # RMS distance of the centroid track from its fitted line, pixels (nan without one)


def _majority(values: list[str]) -> str:
    value, count = Counter(values).most_common(1)[0]
    return value if count * 2 > len(values) else "mixed"


def read_motion(xs: list[float | None]) -> tuple[str, float, float]:
    """Motion, fitted displacement and residual of a centroid track (None where no blob was found)."""
    found = [(t, x) for t, x in enumerate(xs) if x is not None]
    if len(found) * 2 <= len(xs) or len(found) < 2:
        return "none", float("nan"), float("nan")
    t, x = (np.array(v, dtype=np.float64) for v in zip(*found))
    slope, intercept = np.polyfit(t, x, 1)
    residual = float(np.sqrt(np.mean((x - (slope * t + intercept)) ** 2)))
    displacement = float(slope * (len(xs) - 1))
    if residual > ERRATIC_PX:
        return "erratic", displacement, residual
    if abs(displacement) < STILL_PX:
        return "still", displacement, residual
    return ("right" if displacement > 0 else "left"), displacement, residual


def read_video(video: np.ndarray) -> VideoReading:
    """Colour, shape and motion of an F x H x W x 3 video in [0, 1] (see the module docstring)."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise RewardInputError(f"a video must be F x H x W x 3, got shape {video.shape}")
    readings = [sw.read_image(frame) for frame in video]
    centroids = [blob_centroid(frame) for frame in video]
    motion, displacement, residual = read_motion([None if c is None else c[0] for c in centroids])
    return VideoReading(
        colour=_majority([r.colour for r in readings]),
        shape=_majority([r.shape for r in readings]),
        motion=motion,
        displacement=displacement,
        residual=residual,
    )


def judge_video(video: np.ndarray, prompt: str) -> dict[str, bool]:
    """For each attribute of ``prompt`` (colour, shape, motion): does the F x H x W x 3 video show it?"""
    scene, reading = parse_prompt(prompt), read_video(video)
    return {attribute: getattr(scene, attribute) == getattr(reading, attribute) for attribute in ATTRIBUTES}


class ShapeWorldVideoOracle(Reward):
    """1 when every attribute of the prompt is shown, else 0; each attribute is a dimension (0/1).
    Takes videos ``B x 3 x F x H x W`` in [0, 1], the layout of every reward (``rewards.base``); a
    generator's ``B x F x 3 x H x W`` pixels (and :func:`render_video_batch`) need ``.transpose(1, 2)``."""

    info = RewardInfo(
        name="shapeworld-video-oracle",
        description="rule-based ShapeWorld video judge (colour, shape, motion)",
        differentiable=False,
        modality="video",
        scale="1 if every attribute is right, else 0; dims per attribute",
        typical_range=(0.0, 1.0),
        judge=True,
    )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        videos = pixels.detach().permute(0, 2, 3, 4, 1).float().cpu().numpy()  # B x F x H x W x 3
        verdicts = [judge_video(video, prompt) for video, prompt in zip(videos, prompts)]
        dims = {a: torch.tensor([float(v[a]) for v in verdicts], device=pixels.device) for a in ATTRIBUTES}
        return RewardOutput(torch.stack(list(dims.values())).prod(0), dims)


# --------------------------------------------------------------------------------------- learned reward
class ShapeWorldVideoCLIP(Reward):
    """The video testbed's learned reward: a tiny CLIP whose vision tower sees a video's frames stacked as
    channels (``3F``, frame-major), fine-tuned on the video generator's samples labelled by the oracle;
    score = ``a cos(video, prompt) + b``, the logit of P(the oracle calls the video right). Takes videos
    ``B x 3 x F x H x W`` in [0, 1] with exactly the ``frames`` it was trained on."""

    info = RewardInfo(
        name="shapeworld-video-clip",
        description="ShapeWorld video's learned reward (tiny frame-stacking CLIP trained on oracle-labelled videos)",
        differentiable=True,
        modality="video",
        scale="a * cos + b: the logit of P(colour, shape and motion right)",
        typical_range=(-8.0, 6.0),
        default_checkpoint="assets/shapeworld_video/clip (shipped)",
    )

    def __init__(self, encoder: torch.nn.Module, a: float, b: float, frames: int):
        super().__init__()
        self.encoder, self.a, self.b, self.frames = encoder, float(a), float(b), int(frames)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        if pixels.ndim != 5 or pixels.shape[1] != 3 or pixels.shape[2] != self.frames:
            raise RewardInputError(
                f"shapeworld-video-clip scores videos B x 3 x {self.frames} x H x W (all {self.frames} frames: "
                f"it reads motion from them together), got shape {tuple(pixels.shape)}; decode every frame "
                "(no frame subset) for this reward"
            )
        stacked = pixels.transpose(1, 2).flatten(1, 2)  # B x F x 3 x H x W -> B x 3F x H x W
        cosine = (self.encoder.embed_images(stacked) * self.encoder.embed_texts(prompts)).sum(-1)
        return RewardOutput(self.a * cosine + self.b)


def load_shapeworld_video_clip(
    *, pretrained: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> ShapeWorldVideoCLIP:
    """The shipped reward (``pretrained``: another folder in the same layout: CLIP, processor with the
    per-frame normalisation, reward_config.json with ``a``, ``b`` and ``frames``)."""
    import json
    import os

    from rewards.clip import HFCLIPEncoder

    if pretrained is None:
        import vialign_assets

        pretrained = str(vialign_assets.path("shapeworld_video", "clip"))
    config_file = os.path.join(pretrained, "reward_config.json")
    if not os.path.isfile(config_file):
        raise RewardInputError(
            f"shapeworld-video-clip: {pretrained} has no reward_config.json (the head's a, b and frames); "
            "rebuild the testbed with python -m vialign.testbed.video"
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            head = json.load(f)
        a, b, frames = float(head["a"]), float(head["b"]), int(head["frames"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        raise DamagedCheckpointError(
            f"shapeworld-video-clip: {config_file} is damaged ({type(error).__name__}: {error}); it needs "
            '{"a": ..., "b": ..., "frames": ...}: restore it from a good copy'
        ) from None
    encoder = HFCLIPEncoder.load(
        pretrained, default_id=pretrained, what="shapeworld-video-clip", device=device, dtype=dtype
    )
    return ShapeWorldVideoCLIP(encoder, a, b, frames)
