"""ShapeWorld: a world of one coloured shape on a plain background, its prompts, and a rule-based oracle.

The world (deterministic by seed): 6 colours x 4 shapes x 2 sizes x 3 positions = 144 prompts such as
``"a small red circle on the left"``. Six colour-shape pairs never appear in training prompts (with
any size or position): the held-out prompts test generalisation to unseen combinations.

Prompt sets (``PROMPT_SETS``; ``vialign`` names them ``shapeworld:<name>``): ``train`` (108, the
generator's pretraining prompts), ``held_out`` (36, the six pairs in all six slots), ``all`` (144), and the
alignment protocol's split, GenEval-style (disjoint prompts, same vocabulary): ``eval`` (18, the six
held-out pairs in the slots of ``EVAL_SLOTS``) is what alignment is judged on and never trains on;
``align`` (126, every other prompt) is what alignment trains on.

The oracle reads an image and decides, for each attribute of the prompt, whether the image shows it:
it estimates the background from the border, segments the largest foreground blob, and measures its
colour (nearest palette colour), size (bounding-box extent), position (bounding-box centre) and shape
(fill ratio, corner occupancy and the arm structure of a cross, against prototypes). It is the
held-out judge of the testbed — like human evaluation, never a training reward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.errors import DamagedCheckpointError, RewardInputError

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.62, 0.22, 0.85),
    "orange": (0.98, 0.55, 0.08),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.16, "large": 0.27}  # half-extent as a fraction of the image side
POSITIONS = {"left": 0.28, "center": 0.5, "right": 0.72}  # horizontal centre as a fraction of the width
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
ATTRIBUTES = ("colour", "shape", "size", "position")
# Colour-shape pairs that no training prompt contains (each colour and each shape is still seen).
HELD_OUT_PAIRS = {
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("purple", "cross"),
    ("orange", "circle"),
}
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


def all_scenes() -> list[Scene]:
    return [Scene(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def train_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if not scene.held_out]


def held_out_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if scene.held_out]


# (size, position) slots of the evaluation split; the held-out pairs in the other three slots are trained on
EVAL_SLOTS = (("small", "left"), ("large", "center"), ("small", "right"))


def _in_eval_split(scene: Scene) -> bool:
    return scene.held_out and (scene.size, scene.position) in EVAL_SLOTS


def eval_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if _in_eval_split(scene)]


def align_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes() if not _in_eval_split(scene)]


PROMPT_SETS = {
    "train": train_prompts,
    "held_out": held_out_prompts,
    "all": lambda: [scene.prompt for scene in all_scenes()],
    "eval": eval_prompts,
    "align": align_prompts,
}


PROMPT_PATTERN = re.compile(
    r"^a (?P<size>small|large) (?P<colour>\w+) (?P<shape>\w+) (?:on the (?P<side>left|right)|in the (?P<centre>center))$"
)


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes; a prompt outside the world is an error."""
    match = PROMPT_PATTERN.match(prompt.strip().lower())
    if match is None or match["colour"] not in COLOURS or match["shape"] not in SHAPES:
        raise RewardInputError(
            f"{prompt!r} is not a ShapeWorld prompt ('a <small|large> <{'|'.join(COLOURS)}> <{'|'.join(SHAPES)}> "
            "<on the left|in the center|on the right>')"
        )
    return Scene(match["colour"], match["shape"], match["size"], match["side"] or "center")


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Inside-test of a shape centred at 0 with half-extent ``half`` (image y grows downwards)."""
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        side = half * 0.9  # a little smaller than the circle's box, so areas stay comparable
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":
        arm = half / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, seed: int, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """H x W x 3 float32 image in [0, 1]: the scene with seeded jitter of position, size, colour and
    background, antialiased by supersampling."""
    rng = np.random.default_rng(seed)
    background = np.full(3, rng.uniform(0.08, 0.30), dtype=np.float32)
    colour = np.clip(np.array(COLOURS[scene.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    half = SIZES[scene.size] * size * rng.uniform(0.93, 1.07)
    cx = POSITIONS[scene.position] * size + rng.uniform(-1.5, 1.5)
    cy = 0.5 * size + rng.uniform(-2.5, 2.5)
    fine = size * supersample
    coords = (np.arange(fine) + 0.5) / supersample
    xs, ys = np.meshgrid(coords, coords)
    inside = shape_mask(scene.shape, xs - cx, ys - cy, half).astype(np.float32)
    coverage = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
    return (background * (1 - coverage) + colour * coverage).astype(np.float32)


def render_batch(scenes: list[Scene], seeds: list[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """B x 3 x H x W float tensor of renders."""
    return torch.from_numpy(np.stack([render(s, seed, size) for s, seed in zip(scenes, seeds)])).permute(
        0, 3, 1, 2
    )


# ---------------------------------------------------------------------------------------------- oracle
def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        current += 1
        stack, count = [start], 0
        labels[start] = current
        while stack:
            y, x = stack.pop()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if count > best_size:
            best, best_size = current, count
    return labels == best if best else np.zeros_like(mask)


def _box_filter(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, 1, mode="edge")
    return (
        sum(padded[dy : dy + image.shape[0], dx : dx + image.shape[1]] for dy in range(3) for dx in range(3))
        / 9
    )


# Mean features of clean renders of each shape (both sizes): fill ratio of the bounding box, occupancy
# of its top and bottom quarter-corners, and of its four third-corners (empty only for a cross).
SHAPE_PROTOTYPES = {
    "circle": (0.80, 0.22, 0.21, 0.50),
    "square": (1.00, 0.98, 0.99, 0.99),
    "triangle": (0.555, 0.00, 0.87, 0.42),
    "cross": (0.55, 0.00, 0.00, 0.00),
}


@dataclass(frozen=True)
class Reading:
    """What the oracle sees in one image."""

    colour: str
    shape: str
    size: str
    position: str
    found: bool = True


def read_image(image: np.ndarray) -> Reading:
    """Colour, shape, size and position of the main blob of an H x W x 3 image in [0, 1]."""
    height, width, _ = image.shape
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(image - background, axis=-1)
    peak = _box_filter(distance).max()
    if peak < 0.1:
        return Reading("none", "none", "none", "none", found=False)
    mask = _largest_component(distance > 0.5 * peak)
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box_h, box_w = bottom - top, right - left
    # colour: the blob's pixels far from the background (its interior), nearest palette colour
    core = mask & (distance > 0.8 * peak)
    mean = image[core if core.sum() >= 3 else mask].mean(axis=0)
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - mean) ** 2)))
    extent = max(box_h, box_w) / max(height, width)
    size = "small" if extent < (SIZES["small"] + SIZES["large"]) else "large"  # extent ~ 2 x half
    centre_x = (left + right) / 2 / width
    position = "left" if centre_x < 0.39 else ("right" if centre_x > 0.61 else "center")
    box = mask[top:bottom, left:right].astype(np.float32)
    quarter_h, quarter_w = max(1, box_h // 4), max(1, box_w // 4)
    third_h, third_w = max(1, box_h // 3), max(1, box_w // 3)
    features = np.array(
        [
            box.mean(),
            (box[:quarter_h, :quarter_w].mean() + box[:quarter_h, -quarter_w:].mean()) / 2,
            (box[-quarter_h:, :quarter_w].mean() + box[-quarter_h:, -quarter_w:].mean()) / 2,
            np.mean(
                [
                    box[:third_h, :third_w].mean(),
                    box[:third_h, -third_w:].mean(),
                    box[-third_h:, :third_w].mean(),
                    box[-third_h:, -third_w:].mean(),
                ]
            ),
        ]
    )
    shape = min(
        SHAPE_PROTOTYPES, key=lambda s: float(np.sum((np.array(SHAPE_PROTOTYPES[s]) - features) ** 2))
    )
    return Reading(colour, shape, size, position)


def judge(image: np.ndarray, prompt: str) -> dict[str, bool]:
    """For each attribute of ``prompt``: does the image show it?"""
    scene, reading = parse_prompt(prompt), read_image(image)
    return {attribute: getattr(scene, attribute) == getattr(reading, attribute) for attribute in ATTRIBUTES}


class ShapeWorldOracle(Reward):
    """1 when every attribute of the prompt is shown, else 0; each attribute is a dimension (0/1)."""

    info = RewardInfo(
        name="shapeworld-oracle",
        description="rule-based ShapeWorld judge (colour, shape, size, position)",
        differentiable=False,
        modality="image",
        scale="1 if every attribute is right, else 0; dims per attribute",
        typical_range=(0.0, 1.0),
        judge=True,
    )

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        images = pixels.detach().permute(0, 2, 3, 1).float().cpu().numpy()
        verdicts = [judge(image, prompt) for image, prompt in zip(images, prompts)]
        dims = {a: torch.tensor([float(v[a]) for v in verdicts], device=pixels.device) for a in ATTRIBUTES}
        return RewardOutput(torch.stack(list(dims.values())).prod(0), dims)


class ShapeWorldCLIP(Reward):
    """The testbed's learned reward: a tiny CLIP fine-tuned on the generator's samples labelled by the
    oracle; score = ``a cos(image, prompt) + b``, the logit of P(the oracle calls the sample right)."""

    info = RewardInfo(
        name="shapeworld-clip",
        description="ShapeWorld's learned reward (tiny CLIP trained on oracle-labelled samples)",
        differentiable=True,
        modality="image",
        scale="a * cos + b: the logit of P(all attributes right)",
        typical_range=(-8.0, 6.0),
        default_checkpoint="assets/shapeworld/clip (shipped)",
    )

    def __init__(self, encoder: torch.nn.Module, a: float, b: float):
        super().__init__()
        self.encoder, self.a, self.b = encoder, float(a), float(b)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        cosine = (self.encoder.embed_images(pixels) * self.encoder.embed_texts(prompts)).sum(-1)
        return RewardOutput(self.a * cosine + self.b)


def load_shapeworld_clip(
    *, pretrained: str | None = None, device: str = "cpu", dtype: str = "float32"
) -> ShapeWorldCLIP:
    """The shipped reward (``pretrained``: another folder in the same layout: CLIP, processor, reward_config.json)."""
    import json
    import os

    from rewards.clip import HFCLIPEncoder

    if pretrained is None:
        import vialign_assets

        pretrained = str(vialign_assets.path("shapeworld", "clip"))
    config_file = os.path.join(pretrained, "reward_config.json")
    if not os.path.isfile(config_file):
        raise RewardInputError(
            f"shapeworld-clip: {pretrained} has no reward_config.json (the head's a and b)"
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            head = json.load(f)
        a, b = float(head["a"]), float(head["b"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as error:
        raise DamagedCheckpointError(
            f"shapeworld-clip: {config_file} is damaged ({type(error).__name__}: {error}); it needs the numbers "
            '{"a": ..., "b": ...}: restore it from a good copy'
        ) from None
    encoder = HFCLIPEncoder.load(
        pretrained, default_id=pretrained, what="shapeworld-clip", device=device, dtype=dtype
    )
    return ShapeWorldCLIP(encoder, a, b)
