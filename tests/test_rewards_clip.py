"""CLIP-family rewards against their official preprocessing (PIL through open_clip's preprocess or the
transformers image processor), on tiny random weights of the real classes loaded the real way."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tiny_rewards import (
    PROMPTS,
    random_images,
    register_tiny_open_clip,
    save_tiny_aesthetic_head,
    save_tiny_hf_clip,
    save_tiny_open_clip_weights,
    to_pixels,
)
from torchvision.transforms import InterpolationMode

import rewards
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

IMAGES = random_images(16)
PARITY_RTOL = 0.01  # the bar: within 1% of the official path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-checkpoints")
    name = register_tiny_open_clip(root / "open_clip_configs")
    return {
        "hf_clip": str(save_tiny_hf_clip(root / "hf-clip", seed=0)),
        "pick": str(save_tiny_hf_clip(root / "pickscore", seed=1)),
        "open_clip_name": name,
        "open_clip": str(save_tiny_open_clip_weights(root / "open_clip.bin", seed=2)),
        "hps": str(save_tiny_open_clip_weights(root / "HPS_v2_compressed.pt", seed=3, hps_layout=True)),
        "aesthetic_head": str(save_tiny_aesthetic_head(root / "aesthetic-model.pth", dim=32)),
    }


def hf_official(folder: str, images, prompts):
    """The model card way: CLIPProcessor on PIL images, get_*_features, normalise."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        image_inputs = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        text_inputs = processor(
            text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        image = model.get_image_features(**image_inputs).pooler_output
        text = model.get_text_features(**text_inputs).pooler_output
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(-1), model.logit_scale.exp(), image


def hps_official_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform (its ResizeMaxSize: longest side to 224, zero pad) on a PIL image."""
    width, height = image.size
    scale = size / float(max(height, width))
    new_size = (round(height * scale), round(width * scale))
    image = TF.resize(image, new_size, InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new_size[0], size - new_size[1]
    image = TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(TF.to_tensor(image), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def ours(reward, images, prompts):
    with torch.no_grad():
        return torch.cat([reward(to_pixels(image), [prompt]).score for image, prompt in zip(images, prompts)])


def prompts_for(images):
    return [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]


def assert_within(mine: torch.Tensor, official: torch.Tensor, rtol: float = PARITY_RTOL):
    """Within 1% of each official score; a score near zero (random tiny weights put some cosines at
    ~0.01) is held to 1% of the mean score magnitude instead, where a relative error means nothing."""
    scale = torch.maximum(official.abs(), official.abs().mean())
    relative = ((mine - official).abs() / scale).max().item()
    assert relative <= rtol, f"max relative difference {relative:.4%} (scores {official.tolist()})"


@pytest.mark.parametrize("mode", ["cosine", "hessel"])
def test_clipscore_transformers_matches_the_processor_path(checkpoints, mode):
    reward = rewards.load_reward("clipscore", pretrained=checkpoints["hf_clip"], mode=mode)
    prompts = prompts_for(IMAGES)
    cosine, _, _ = hf_official(checkpoints["hf_clip"], IMAGES, prompts)
    mine = ours(reward, IMAGES, prompts)
    if mode == "cosine":
        assert_within(mine, cosine)
    else:
        expected = 2.5 * cosine.clamp(min=0)
        positive = expected > 0
        assert_within(mine[positive], expected[positive])
        assert (mine[~positive] == 0).all()


def test_clipscore_open_clip_matches_open_clips_preprocess(checkpoints):
    import open_clip

    name = checkpoints["open_clip_name"]
    reward = rewards.load_reward(
        "clipscore", backend="open_clip", model_name=name, pretrained=checkpoints["open_clip"], mode="cosine"
    )
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoints["open_clip"])
    tokenizer = open_clip.get_tokenizer(name)
    prompts = prompts_for(IMAGES)
    with torch.no_grad():
        image = model.encode_image(
            torch.stack([preprocess(Image.fromarray(i)) for i in IMAGES]), normalize=True
        )
        text = model.encode_text(tokenizer(prompts), normalize=True)
    assert_within(ours(reward, IMAGES, prompts), (image * text).sum(-1))


def test_pickscore_matches_its_model_card(checkpoints):
    reward = rewards.load_reward("pickscore", pretrained=checkpoints["pick"])
    prompts = prompts_for(IMAGES)
    cosine, logit_scale, _ = hf_official(checkpoints["pick"], IMAGES, prompts)
    assert_within(ours(reward, IMAGES, prompts), logit_scale * cosine)


@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1"])
def test_hps_matches_hpsv2_preprocessing(checkpoints, name):
    import open_clip

    reward = rewards.load_reward(
        name, pretrained=checkpoints["hps"], model_name=checkpoints["open_clip_name"]
    )
    model = open_clip.create_model(checkpoints["open_clip_name"], pretrained=None)
    model.load_state_dict(torch.load(checkpoints["hps"], weights_only=True)["state_dict"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(checkpoints["open_clip_name"])
    prompts = prompts_for(IMAGES)
    with torch.no_grad():
        image = model.encode_image(
            torch.stack([hps_official_preprocess(Image.fromarray(i)) for i in IMAGES]), normalize=True
        )
        text = model.encode_text(tokenizer(prompts), normalize=True)
    assert_within(ours(reward, IMAGES, prompts), (image * text).sum(-1))


def test_aesthetic_matches_the_processor_path(checkpoints):
    from rewards.clip import AestheticMLP

    reward = rewards.load_reward(
        "aesthetic", pretrained=checkpoints["hf_clip"], head=checkpoints["aesthetic_head"]
    )
    _, _, image = hf_official(checkpoints["hf_clip"], IMAGES, prompts_for(IMAGES))
    head = AestheticMLP(32)
    head.load_state_dict(torch.load(checkpoints["aesthetic_head"], weights_only=True))
    with torch.no_grad():
        expected = head.eval()(image)
    assert_within(ours(reward, IMAGES, [""] * len(IMAGES)), expected)
    assert reward(to_pixels(IMAGES[0]), None).score.shape == (1,)  # the prompt is optional


@pytest.mark.parametrize(
    "name,options",
    [
        ("clipscore", {"mode": "cosine"}),
        ("pickscore", {}),
        ("aesthetic", {}),
        ("hpsv2", {}),
    ],
)
def test_gradients_reach_the_pixels_and_batches_match_singles(checkpoints, name, options):
    options = dict(options)
    if name == "clipscore":
        options["pretrained"] = checkpoints["hf_clip"]
    elif name == "pickscore":
        options["pretrained"] = checkpoints["pick"]
    elif name == "aesthetic":
        options.update(pretrained=checkpoints["hf_clip"], head=checkpoints["aesthetic_head"])
    else:
        options.update(pretrained=checkpoints["hps"], model_name=checkpoints["open_clip_name"])
    reward = rewards.load_reward(name, **options)
    assert reward.info.differentiable
    pixels = torch.stack(
        [to_pixels(image)[0] for image in IMAGES[:4] if image.shape == IMAGES[0].shape]
        + [torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    )
    pixels.requires_grad_(True)
    out = reward(pixels, PROMPTS[: len(pixels)])
    out.score.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    with torch.no_grad():
        singles = torch.cat([reward(pixels[i : i + 1], [PROMPTS[i]]).score for i in range(len(pixels))])
    torch.testing.assert_close(out.score.detach(), singles, rtol=1e-5, atol=1e-5)


def test_missing_checkpoint_names_the_id_and_the_fix(tmp_path):
    with pytest.raises(rewards.CheckpointNotFoundError) as error:
        rewards.load_reward("pickscore")
    message = str(error.value)
    assert (
        "yuvalkirstain/PickScore_v1" in message and "pretrained=" in message and "HF_HUB_OFFLINE" in message
    )
    with pytest.raises(rewards.CheckpointNotFoundError, match=r"xswu/HPSv2/HPS_v2.1_compressed.pt not found"):
        rewards.load_reward("hpsv2.1")
    with pytest.raises(rewards.CheckpointNotFoundError, match="checkpoint file not found"):
        rewards.load_reward("hpsv2", pretrained=str(tmp_path / "missing.pt"))
