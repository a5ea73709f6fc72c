"""The reward interface: input checks, programmatic rewards by hand, combine, loss transforms, video
frame sampling, the registry."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.video import frame_indices


def test_list_rewards_has_metadata_for_every_name():
    infos = {info.name: info for info in rewards.list_rewards()}
    assert {
        "clipscore",
        "pickscore",
        "hpsv2",
        "hpsv2.1",
        "aesthetic",
        "brightness",
        "saturation",
        "colorfulness",
        "jpeg-compressibility",
        "jpeg-incompressibility",
        "temporal-consistency",
    } <= set(infos)
    assert infos["pickscore"].differentiable and "logit_scale" in infos["pickscore"].scale
    assert not infos["jpeg-compressibility"].differentiable
    assert (
        infos["aesthetic"].needs_prompt is False
        and "aesthetic-model.pth" in infos["aesthetic"].default_checkpoint
    )
    for info in infos.values():
        assert info.typical_range[0] <= info.typical_range[1] and info.scale and info.modality


@pytest.mark.parametrize(
    "pixels,prompts,message",
    [
        (torch.rand(2, 3, 8, 8) * 2, ["a", "b"], r"pixels must lie in \[0, 1\], got values in"),
        (torch.rand(2, 3, 8, 8) - 0.5, ["a", "b"], "x / 2 \\+ 0.5"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], r"must lie in \[0, 1\]"),
        (torch.rand(3, 8, 8), ["a"], "B x C x H x W"),
        (torch.rand(2, 1, 8, 8), ["a", "b"], "3 \\(RGB\\) channels"),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), ["a", "b"], "divide uint8 images by 255"),
        (torch.rand(2, 3, 8, 8), ["a"], "1 prompts for a batch of 2"),
        (torch.rand(2, 3, 8, 8), "a cat", "prompts must be a list of 2 strings"),
    ],
)
def test_bad_inputs_are_clear_errors(pixels, prompts, message):
    reward = rewards.combine(
        {"brightness": 1.0}, rewards={"brightness": _needs_prompt(rewards.load_reward("brightness"))}
    )
    with pytest.raises(rewards.RewardInputError, match=message):
        reward(pixels, prompts)


def _needs_prompt(reward):
    from dataclasses import replace

    reward.info = replace(reward.info, needs_prompt=True)
    return reward


def test_programmatic_rewards_by_hand():
    """A 2x1 image: pixels (1, 0, 0) and (0.5, 0.5, 0.5)."""
    pixels = torch.tensor([[1.0, 0.5], [0.0, 0.5], [0.0, 0.5]]).view(1, 3, 1, 2)
    assert rewards.load_reward("brightness")(pixels).score.item() == pytest.approx(
        (0.299 + 0.5) / 2, rel=1e-6
    )
    # saturation: red (1 - 0) / 1 = 1, grey 0 -> mean 0.5
    assert rewards.load_reward("saturation")(pixels).score.item() == pytest.approx(0.5, rel=1e-5)
    # colourfulness on 0..255: rg = (255, 0), yb = (127.5, 0): std_rg = 127.5, std_yb = 63.75, mean_rg = 127.5, mean_yb = 63.75
    expected = np.hypot(127.5, 63.75) + 0.3 * np.hypot(127.5, 63.75)
    assert rewards.load_reward("colorfulness")(pixels).score.item() == pytest.approx(expected, rel=1e-5)


def test_jpeg_rewards_match_pil_encoding():
    generator = torch.Generator().manual_seed(0)
    noisy, flat = torch.rand(1, 3, 64, 64, generator=generator), torch.full((1, 3, 64, 64), 0.5)
    pixels = torch.cat([noisy, flat])
    buffer = io.BytesIO()
    Image.fromarray((noisy[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, "JPEG", quality=95
    )
    compress = rewards.load_reward("jpeg-compressibility")(pixels).score
    assert compress[0].item() == pytest.approx(-buffer.tell() / 1000)
    assert compress[1] > compress[0]  # a flat image compresses better
    assert torch.equal(rewards.load_reward("jpeg-incompressibility")(pixels).score, -compress)


def test_differentiable_rewards_give_pixel_gradients_and_jpeg_is_refused():
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for name in ("brightness", "saturation", "colorfulness"):
        reward = rewards.load_reward(name)
        rewards.require_differentiable(reward)
        (grad,) = torch.autograd.grad(reward(pixels).score.sum(), pixels)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(rewards.RewardInputError) as error:
        rewards.require_differentiable(rewards.load_reward("jpeg-compressibility"), "DRaFT")
    assert "DRaFT needs gradients" in str(error.value) and "pickscore" in str(error.value)


def test_combine_is_the_weighted_sum_with_components_in_dims():
    pixels = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    combined = rewards.combine({"brightness": 2.0, "saturation": -0.5})
    out = combined(pixels, ["a", "b", "c"])
    bright, sat = (
        rewards.load_reward("brightness")(pixels).score,
        rewards.load_reward("saturation")(pixels).score,
    )
    torch.testing.assert_close(out.score, 2.0 * bright - 0.5 * sat)
    assert set(out.dims) == {"brightness", "saturation"} and torch.equal(out.dims["brightness"], bright)
    assert combined.info.differentiable and not combined.info.needs_prompt
    assert not rewards.combine({"brightness": 1.0, "jpeg-compressibility": 1.0}).info.differentiable
    nested = rewards.combine({"inner": 1.0}, rewards={"inner": combined})(pixels, ["a", "b", "c"])
    assert set(nested.dims) == {"inner", "inner/brightness", "inner/saturation"}


def test_loss_transforms():
    score = torch.tensor([-1.0, 0.5, 3.0])
    torch.testing.assert_close(rewards.LossTransform("negate")(score), -score)
    torch.testing.assert_close(
        rewards.LossTransform("hinge", margin=2.0)(score), torch.tensor([3.0, 1.5, 0.0])
    )
    torch.testing.assert_close(
        rewards.LossTransform("target", target=0.5)(score), torch.tensor([1.5, 0.0, 2.5])
    )
    with pytest.raises(rewards.RewardInputError, match="needs margin"):
        rewards.LossTransform("hinge")
    with pytest.raises(rewards.RewardInputError, match="choose one of negate, hinge, target"):
        rewards.LossTransform("square")


def test_unknown_names_and_options():
    with pytest.raises(rewards.RewardInputError, match=r"unknown reward 'pickscor' \(did you mean pickscore"):
        rewards.load_reward("pickscor")
    with pytest.raises(rewards.RewardInputError, match="has no option\\(s\\) colour; it accepts: none"):
        rewards.load_reward("brightness", colour="red")
    with pytest.raises(rewards.RewardInputError, match="options given for \\['x'\\]"):
        rewards.combine({"brightness": 1.0}, options={"x": {}})


def test_video_frame_sampling():
    assert frame_indices(10, "uniform", 4) == [0, 3, 6, 9]
    assert frame_indices(3, "uniform", 8) == [0, 1, 2]
    assert frame_indices(10, "first-middle-last", 0) == [0, 4, 9]
    assert frame_indices(5, "all", 0) == [0, 1, 2, 3, 4]
    video = torch.rand(2, 3, 10, 8, 8, generator=torch.Generator().manual_seed(3))
    wrapped = rewards.load_reward("brightness", frames="uniform", num_frames=4)
    per_frame = torch.stack(
        [rewards.load_reward("brightness")(video[:, :, t]).score for t in (0, 3, 6, 9)], 1
    )
    torch.testing.assert_close(wrapped(video).score, per_frame.mean(1))
    assert wrapped(video[:, :, 0]).score.shape == (2,)  # images pass through


def test_image_reward_refuses_video_without_frame_sampling(tmp_path):
    from tiny_rewards import save_tiny_hf_clip

    reward = rewards.load_reward("clipscore", pretrained=str(save_tiny_hf_clip(tmp_path / "clip")))
    with pytest.raises(rewards.RewardInputError, match="frames='uniform'"):
        reward(torch.rand(1, 3, 4, 32, 32), ["a"])


def test_temporal_consistency(tmp_path):
    from tiny_rewards import save_tiny_hf_clip

    reward = rewards.load_reward("temporal-consistency", pretrained=str(save_tiny_hf_clip(tmp_path / "clip")))
    frame = torch.rand(1, 3, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    still = frame.expand(1, 3, 5, 64, 64)
    changing = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(5))
    scores = reward(torch.cat([still, changing])).score
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5) and scores[1] < scores[0]
    embeddings = reward.encoder.embed_images(changing[0].permute(1, 0, 2, 3))
    expected = (embeddings[1:] * embeddings[:-1]).sum(-1).mean()
    assert scores[1].item() == pytest.approx(expected.item(), rel=1e-5)
