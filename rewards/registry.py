"""Rewards by name: ``load_reward(name, **options)`` and ``list_rewards()``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from rewards import clip, imagereward, programmatic, shapeworld, video, vlm
from rewards.base import Reward, RewardInfo
from rewards.errors import RewardInputError


@dataclass(frozen=True)
class Entry:
    info: RewardInfo
    load: Callable[..., Reward]


def _fixed(reward_cls: type[Reward] | Callable[[], Reward]) -> Callable[..., Reward]:
    def load() -> Reward:
        return reward_cls()

    return load


REGISTRY: dict[str, Entry] = {
    "clipscore": Entry(clip.CLIPSCORE_INFO, clip.load_clipscore),
    "pickscore": Entry(clip.PICKSCORE_INFO, clip.load_pickscore),
    "hpsv2": Entry(clip.HPS_INFO["2"], clip.load_hps("2")),
    "hpsv2.1": Entry(clip.HPS_INFO["2.1"], clip.load_hps("2.1")),
    "aesthetic": Entry(clip.AESTHETIC_INFO, clip.load_aesthetic),
    "imagereward": Entry(imagereward.INFO, imagereward.load_imagereward),
    "vqascore": Entry(vlm.VQASCORE_INFO, vlm.load_vqascore),
    "checklist": Entry(vlm.CHECKLIST_INFO, vlm.load_checklist),
    "multihead-vlm": Entry(vlm.MULTIHEAD_INFO, vlm.load_multihead_vlm),
    "brightness": Entry(programmatic.Brightness.info, _fixed(programmatic.Brightness)),
    "saturation": Entry(programmatic.Saturation.info, _fixed(programmatic.Saturation)),
    "colorfulness": Entry(programmatic.Colorfulness.info, _fixed(programmatic.Colorfulness)),
    "jpeg-compressibility": Entry(programmatic.JPEGSize(-1).info, _fixed(lambda: programmatic.JPEGSize(-1))),
    "jpeg-incompressibility": Entry(
        programmatic.JPEGSize(+1).info, _fixed(lambda: programmatic.JPEGSize(+1))
    ),
    "shapeworld-oracle": Entry(shapeworld.ShapeWorldOracle.info, _fixed(shapeworld.ShapeWorldOracle)),
    "shapeworld-clip": Entry(shapeworld.ShapeWorldCLIP.info, shapeworld.load_shapeworld_clip),
    "temporal-consistency": Entry(video.TemporalConsistency.info, video.load_temporal_consistency),
}


def register(name: str, info: RewardInfo, load: Callable[..., Reward]) -> None:
    """Add a reward under ``name`` (for rewards defined outside this package)."""
    if name in REGISTRY:
        raise RewardInputError(f"a reward named {name!r} is already registered")
    REGISTRY[name] = Entry(info, load)


def list_rewards() -> list[RewardInfo]:
    """Every registered reward's metadata (name, differentiable, modality, scale, range, checkpoint...)."""
    return [entry.info for entry in REGISTRY.values()]


def load_reward(name: str, *, frames: str | None = None, num_frames: int = 8, **options) -> Reward:
    """Build the reward ``name`` (``list_rewards()`` names them); ``options`` go to its loader
    (e.g. ``pretrained=`` for a local checkpoint, ``device=``). ``frames=`` wraps an image reward for
    videos (``uniform``, ``first-middle-last``, ``random``, ``all``; ``num_frames`` for uniform)."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RewardInputError(f"unknown reward {name!r}{hint}; available: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    accepted = inspect.signature(entry.load).parameters
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise RewardInputError(
            f"reward {name!r} has no option(s) {', '.join(unknown)}; it accepts: {', '.join(accepted) or 'none'}"
        )
    reward = entry.load(**options)
    if frames is not None:
        reward = video.FrameSampledReward(reward, frames=frames, num_frames=num_frames)
    return reward.eval()
