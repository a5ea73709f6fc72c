"""The reward interface: ``reward(pixels, prompts) -> RewardOutput``.

``pixels`` are float tensors in [0, 1], ``B x C x H x W`` for images or ``B x C x T x H x W`` for
videos; ``prompts`` is a list of B strings. The output holds ``score`` (Tensor[B], float32; higher is
better unless the metadata says otherwise) and ``dims`` (named Tensor[B] per dimension, empty for
scalar rewards). Every reward validates its input the same way (:func:`check_inputs`), does its own
preprocessing in torch (so gradients reach the pixels when the model allows it) and says in its
:class:`RewardInfo` whether it is differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from rewards.errors import RewardInputError

Modality = Literal["image", "video", "image+video"]


@dataclass(frozen=True)
class RewardInfo:
    """What a reward is, as ``rewards.list_rewards()`` reports it."""

    name: str
    description: str
    differentiable: bool
    modality: Modality  # what it scores natively; image rewards score videos through rewards.video
    scale: str  # how the number is made, e.g. "logit_scale * cosine (~100 cos)"
    typical_range: tuple[float, float]
    higher_is_better: bool = True
    default_checkpoint: str | None = None  # what it loads when no `pretrained=` is given
    needs_prompt: bool = True  # False: the prompt is ignored (aesthetic, programmatic rewards)
    judge: bool = False  # an evaluation judge, not meant as a training reward


@dataclass
class RewardOutput:
    """Scores of a batch: ``score`` [B] and named per-dimension scores [B] (empty for scalar rewards)."""

    score: torch.Tensor
    dims: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score.ndim != 1:
            raise ValueError(
                f"RewardOutput.score must be a 1-d tensor [B], got shape {tuple(self.score.shape)}"
            )
        for name, value in self.dims.items():
            if value.shape != self.score.shape:
                raise ValueError(
                    f"dimension {name!r} has shape {tuple(value.shape)}, score has {tuple(self.score.shape)}"
                )


def check_inputs(
    pixels: torch.Tensor,
    prompts: Sequence[str] | None,
    *,
    modality: Modality = "image+video",
    needs_prompt: bool = True,
    name: str = "reward",
) -> list[str]:
    """Validate the reward input; returns the prompts as a list (empty strings when not needed)."""
    if not isinstance(pixels, torch.Tensor):
        raise RewardInputError(f"{name}: pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise RewardInputError(
            f"{name}: pixels must be floats in [0, 1], got dtype {pixels.dtype} (divide uint8 images by 255)"
        )
    if pixels.ndim not in (4, 5):
        raise RewardInputError(
            f"{name}: pixels must be B x C x H x W (images) or B x C x T x H x W (videos), got shape {tuple(pixels.shape)}"
        )
    if pixels.shape[1] != 3:
        raise RewardInputError(
            f"{name}: pixels must have 3 (RGB) channels on dim 1, got shape {tuple(pixels.shape)}"
        )
    if pixels.ndim == 5 and modality == "image":
        raise RewardInputError(
            f"{name} scores images; for videos wrap it with frame sampling, e.g. "
            f"rewards.load_reward({name!r}, frames='uniform', num_frames=8)"
        )
    if pixels.ndim == 4 and modality == "video":
        raise RewardInputError(f"{name} scores videos (B x C x T x H x W), got images {tuple(pixels.shape)}")
    with torch.no_grad():
        low, high = float(pixels.min()), float(pixels.max())
    if not (low >= 0.0 and high <= 1.0):  # also catches NaN
        raise RewardInputError(
            f"{name}: pixels must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
            "(images in [-1, 1] need x / 2 + 0.5; uint8 images need / 255)"
        )
    batch = pixels.shape[0]
    if prompts is None or isinstance(prompts, str):
        if needs_prompt:
            raise RewardInputError(f"{name}: prompts must be a list of {batch} strings")
        return [""] * batch
    prompts = list(prompts)
    if len(prompts) != batch:
        raise RewardInputError(f"{name}: {len(prompts)} prompts for a batch of {batch} images")
    if any(not isinstance(p, str) for p in prompts):
        raise RewardInputError(f"{name}: prompts must be strings")
    return prompts


class Reward(nn.Module):
    """Base class: validates the input, then calls :meth:`score` (implemented by each reward).

    Subclasses set ``info`` and implement ``score(pixels, prompts) -> RewardOutput``; ``pixels`` arrive
    validated, on any device, float.
    """

    info: RewardInfo

    def forward(self, pixels: torch.Tensor, prompts: Sequence[str] | None = None) -> RewardOutput:
        prompts = check_inputs(
            pixels,
            prompts,
            modality=self.info.modality,
            needs_prompt=self.info.needs_prompt,
            name=self.info.name,
        )
        output = self.score(pixels, prompts)
        if output.score.shape != (pixels.shape[0],):
            raise RewardInputError(
                f"reward {self.info.name!r} returned scores of shape {tuple(output.score.shape)} for "
                f"{pixels.shape[0]} inputs; a reward must return one score per image or video"
            )
        return RewardOutput(score=output.score.float(), dims={k: v.float() for k, v in output.dims.items()})

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")
