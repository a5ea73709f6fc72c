"""Rewards by name: ``load_reward(name, **options)`` and ``list_rewards()``; pairwise judges
(``judge(pixels_a, pixels_b, prompts) -> P(a better)``) by name: ``load_pairwise(name, **options)`` and
``pairwise_names()``. The two registries are disjoint: asking either for a name of the other is an error
saying where that name is used."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from rewards import clip, imagereward, programmatic, shapeworld, shapeworld_video, video, vlm
from rewards.base import Reward, RewardInfo
from rewards.errors import RewardInputError
from rewards.pairwise import PairwiseReward


@dataclass(frozen=True)
class Entry:
    info: RewardInfo
    load: Callable[..., Reward]


@dataclass(frozen=True)
class PairwiseEntry:
    info: RewardInfo
    load: Callable[..., PairwiseReward]


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
    "shapeworld-video-oracle": Entry(
        shapeworld_video.ShapeWorldVideoOracle.info, _fixed(shapeworld_video.ShapeWorldVideoOracle)
    ),
    "shapeworld-video-clip": Entry(
        shapeworld_video.ShapeWorldVideoCLIP.info, shapeworld_video.load_shapeworld_video_clip
    ),
    "temporal-consistency": Entry(video.TemporalConsistency.info, video.load_temporal_consistency),
}


PAIRWISE_REGISTRY: dict[str, PairwiseEntry] = {
    "vlm-pairwise": PairwiseEntry(vlm.PAIRWISE_VLM_INFO, vlm.load_pairwise_vlm),
}


def register(name: str, info: RewardInfo, load: Callable[..., Reward]) -> None:
    """Add a reward under ``name`` (for rewards defined outside this package)."""
    if name in REGISTRY or name in PAIRWISE_REGISTRY:
        raise RewardInputError(f"a reward named {name!r} is already registered")
    REGISTRY[name] = Entry(info, load)


def register_pairwise(name: str, info: RewardInfo, load: Callable[..., PairwiseReward]) -> None:
    """Add a pairwise judge under ``name`` (for judges defined outside this package)."""
    if name in REGISTRY or name in PAIRWISE_REGISTRY:
        raise RewardInputError(f"a reward named {name!r} is already registered")
    PAIRWISE_REGISTRY[name] = PairwiseEntry(info, load)


def pairwise_names() -> list[str]:
    """Names ``load_pairwise`` accepts."""
    return list(PAIRWISE_REGISTRY)


def _check_options(kind: str, name: str, load: Callable, options: dict) -> None:
    accepted = inspect.signature(load).parameters
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise RewardInputError(
            f"{kind} {name!r} has no option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )


def list_rewards() -> list[RewardInfo]:
    """Every registered reward's metadata (name, differentiable, modality, scale, range, checkpoint...)."""
    return [entry.info for entry in REGISTRY.values()]


def load_reward(name: str, *, frames: str | None = None, num_frames: int = 8, **options) -> Reward:
    """Build the reward ``name`` (``list_rewards()`` names them); ``options`` go to its loader
    (e.g. ``pretrained=`` for a local checkpoint, ``device=``). ``frames=`` wraps an image reward for
    videos (``uniform``, ``first-middle-last``, ``random``, ``all``; ``num_frames`` for uniform)."""
    if name in PAIRWISE_REGISTRY:
        raise RewardInputError(
            f"{name!r} is a pairwise judge (judge(pixels_a, pixels_b, prompts) -> P(a is better)), not a "
            "pointwise reward: use it as GRPO's grpo.judge with grpo.comparison: pairwise-winrate (or "
            f"load it with rewards.load_pairwise({name!r})); pointwise VLM rewards: vqascore, checklist"
        )
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RewardInputError(f"unknown reward {name!r}{hint}; available: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    _check_options("reward", name, entry.load, options)
    reward = entry.load(**options)
    if frames is not None:
        reward = video.FrameSampledReward(reward, frames=frames, num_frames=num_frames)
    return reward.eval()


def load_pairwise(name: str, **options) -> PairwiseReward:
    """Build the pairwise judge ``name`` (``pairwise_names()``); ``options`` go to its loader (e.g.
    ``pretrained=``, ``symmetric=``, ``device=``). Judges are what GRPO's ``grpo.judge`` names."""
    if name in REGISTRY:
        raise RewardInputError(
            f"{name!r} is a pointwise reward, not a pairwise judge; pairwise judges: "
            f"{', '.join(PAIRWISE_REGISTRY)}. A pointwise reward is used pairwise by training on it with "
            "grpo.comparison: pairwise-winrate and no grpo.judge: the training reward is then read as a "
            "Bradley-Terry judge (rewards.PointwiseAsPairwise)"
        )
    if name not in PAIRWISE_REGISTRY:
        close = difflib.get_close_matches(name, PAIRWISE_REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise RewardInputError(
            f"unknown pairwise judge {name!r}{hint}; available: {', '.join(PAIRWISE_REGISTRY)}"
        )
    entry = PAIRWISE_REGISTRY[name]
    _check_options("pairwise judge", name, entry.load, options)
    return entry.load(**options).eval()
