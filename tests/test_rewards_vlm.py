"""VLM rewards on tiny random models of real families (Qwen2-VL, LLaVA, PaliGemma): the yes-token
probability equals softmax(logits)[yes] at the answer position computed by hand from the model's own
forward; the torch preprocessing reproduces the HF processor's pixel tensors; gradients reach pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_vlms import (
    save_tiny_idefics3,
    save_tiny_llava,
    save_tiny_paligemma,
    save_tiny_qwen2_5_vl,
    save_tiny_qwen2_vl,
)

import rewards
from rewards.vlm import DEFAULT_QUESTION

FAMILIES = {
    "qwen2_vl": save_tiny_qwen2_vl,
    "qwen2_5_vl": save_tiny_qwen2_5_vl,
    "llava": save_tiny_llava,
    "paligemma": save_tiny_paligemma,
    "idefics3": save_tiny_idefics3,
}
SIZES = {
    "qwen2_vl": (56, 84),
    "qwen2_5_vl": (56, 84),
    "idefics3": (64, 96),
    "llava": (224, 224),
    "paligemma": (224, 224),
}  # sizes the processor does not resize


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: str(build(root / family)) for family, build in FAMILIES.items()}


def uint8_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((count, height, width, 3)) * 255).round().astype(np.uint8)


def by_hand(folder: str, images: np.ndarray, prompts: list[str], answer: str) -> torch.Tensor:
    """The processor on PIL images, the model's forward, softmax over the whole vocabulary at the last
    (answer) position, the probability of the answer's first token."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = (
        AutoModelForImageTextToText.from_pretrained(folder).eval(),
        AutoProcessor.from_pretrained(folder),
    )
    processor.tokenizer.padding_side = "left"
    probabilities = []
    for image, prompt in zip(images, prompts):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": DEFAULT_QUESTION.format(prompt=prompt)},
                ],
            }
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
        inputs.pop("labels", None)
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        yes = processor.tokenizer.convert_tokens_to_ids(answer)
        probabilities.append(torch.softmax(logits.float(), -1)[yes])
    return torch.stack(probabilities)


@pytest.mark.parametrize(
    "family,answer_token",
    [
        ("qwen2_vl", "Yes"),
        ("qwen2_5_vl", "Yes"),
        ("llava", "\u0120Yes"),
        ("paligemma", "Yes"),
        ("idefics3", "\u0120Yes"),
    ],
)
def test_yes_probability_is_the_softmax_of_the_answer_token(vlm_dirs, family, answer_token):
    reward = rewards.load_reward("vqascore", pretrained=vlm_dirs[family])
    differentiable = family != "idefics3"  # scored through its processor on uint8 images
    assert reward.info.differentiable is differentiable
    assert reward.yes_token_id() == reward.vlm.tokenizer.convert_tokens_to_ids(answer_token)
    height, width = SIZES[family]
    images, prompts = uint8_images(3, height, width), ["a red square", "two cats on a long sofa", "a dog"]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ours = reward(pixels, prompts).score
    expected = by_hand(vlm_dirs[family], images, prompts, answer_token)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    assert ours.min() > 0 and ours.max() < 1
    if not differentiable:
        with pytest.raises(rewards.RewardInputError, match="not differentiable"):
            rewards.require_differentiable(reward)
        return
    pixels = pixels[:2].clone().requires_grad_(True)
    reward(pixels, prompts[:2]).score.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "family,size",
    [("qwen2_vl", (56, 84)), ("qwen2_vl", (100, 150)), ("llava", (300, 200)), ("paligemma", (160, 240))],
)
def test_torch_preprocessing_reproduces_the_processor(vlm_dirs, family, size):
    from transformers import AutoProcessor

    reward = rewards.load_reward("vqascore", pretrained=vlm_dirs[family])
    processor = AutoProcessor.from_pretrained(vlm_dirs[family])
    images = uint8_images(2, *size, seed=1)
    smooth = torch.nn.functional.avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 5, 1, 2)
    images = smooth.round().byte().permute(0, 2, 3, 1).numpy()  # photo-like: no pixel-level noise
    official = processor.image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
    ours = reward.vlm.pixel_values(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert ours["pixel_values"].shape == official["pixel_values"].shape
    if "image_grid_thw" in official:
        assert torch.equal(ours["image_grid_thw"], official["image_grid_thw"])
    difference = (ours["pixel_values"] - official["pixel_values"]).abs()
    if size == SIZES.get(family):
        assert difference.max() < 1e-5  # no resize: the layout is exactly the processor's
    else:
        assert difference.mean() < 0.01 and difference.max() < 0.1  # resampling: PIL/uint8 rounding only


def test_qwen2_vl_scores_videos_through_its_video_processor(vlm_dirs):
    from transformers import AutoProcessor

    reward = rewards.load_reward("vqascore", pretrained=vlm_dirs["qwen2_vl"])
    frames = uint8_images(3, 56, 84, seed=2)
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float().unsqueeze(0) / 255  # 1 x 3 x T x H x W
    processor = AutoProcessor.from_pretrained(vlm_dirs["qwen2_vl"])
    official = processor.video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
    ours, grid = reward.vlm._qwen_video(video)
    assert torch.equal(grid, official["video_grid_thw"])
    torch.testing.assert_close(ours, official["pixel_values_videos"], rtol=0, atol=1e-5)
    video.requires_grad_(True)
    score = reward(video, ["a moving square"]).score
    assert 0 < score.item() < 1
    score.sum().backward()
    assert video.grad.abs().sum() > 0


def test_batches_equal_single_scores(vlm_dirs):
    reward = rewards.load_reward("vqascore", pretrained=vlm_dirs["qwen2_vl"])
    pixels = torch.from_numpy(uint8_images(3, 56, 84, seed=3)).permute(0, 3, 1, 2).float() / 255
    prompts = [
        "a",
        "a much longer prompt about a red square on the left",
        "two dogs",
    ]  # different lengths: padding
    with torch.no_grad():
        batch = reward(pixels, prompts).score
        single = torch.cat([reward(pixels[i : i + 1], [prompts[i]]).score for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-7)


def test_checklist_is_the_weighted_sum_of_question_probabilities(vlm_dirs):
    questions = [
        {"name": "shows", "question": 'Does this show "{prompt}"?', "weight": 2.0},
        {"name": "sharp", "question": "Is it sharp?", "weight": 0.5},
    ]
    checklist = rewards.load_reward("checklist", pretrained=vlm_dirs["llava"], questions=questions)
    scorer = rewards.load_reward("vqascore", pretrained=vlm_dirs["llava"])
    pixels = torch.from_numpy(uint8_images(2, 224, 224, seed=4)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = checklist(pixels, ["a cat", "a dog"])
        shows = scorer.probability(pixels, ['Does this show "a cat"?', 'Does this show "a dog"?'])
        sharp = scorer.probability(pixels, ["Is it sharp?"] * 2)
    torch.testing.assert_close(out.dims["shows"], shows)
    torch.testing.assert_close(out.dims["sharp"], sharp)
    torch.testing.assert_close(out.score, 2.0 * shows + 0.5 * sharp)


def test_multihead_reward_reads_its_head_at_the_special_tokens(tmp_path):
    tokens = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
    folder = save_tiny_qwen2_vl(tmp_path / "videoalign", reward_tokens=tokens)
    weight = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    save_file({"weight": weight}, folder / "reward_head.safetensors")
    config = {
        "special_tokens": list(tokens),
        "dimensions": ["VQ", "MQ", "TA"],
        "question": "Rate: {prompt}",
        "mean": {"VQ": 0.5, "MQ": -1.0},
        "std": {"VQ": 2.0},
        "weights": {"TA": 3.0},
    }
    (folder / "reward_config.json").write_text(json.dumps(config))
    reward = rewards.load_reward("multihead-vlm", pretrained=str(folder))
    pixels = torch.from_numpy(uint8_images(2, 56, 84, seed=5)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = reward(pixels, ["a cat", "a dog on a hill"])
        texts = [
            reward.vlm.render(f"Rate: {p}" + "".join(tokens), generation_prompt=False)
            for p in ["a cat", "a dog on a hill"]
        ]
        inputs = reward.vlm.inputs(pixels, texts)
        hidden = reward.vlm.model(**inputs, output_hidden_states=True).hidden_states[-1]
    for i, name in enumerate(["VQ", "MQ", "TA"]):
        token_id = reward.vlm.tokenizer.convert_tokens_to_ids(tokens[i])
        position = (inputs["input_ids"] == token_id).nonzero()[:, 1]
        raw = hidden[torch.arange(2), position] @ weight[i]
        expected = (raw - config["mean"].get(name, 0.0)) / config["std"].get(name, 1.0)
        torch.testing.assert_close(out.dims[name], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.score, out.dims["VQ"] + out.dims["MQ"] + 3.0 * out.dims["TA"])


def test_missing_vlm_checkpoint_is_a_clear_error():
    with pytest.raises(rewards.CheckpointNotFoundError, match="Qwen/Qwen2-VL-2B-Instruct"):
        rewards.load_reward("vqascore")
