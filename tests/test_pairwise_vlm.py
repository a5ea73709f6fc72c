"""The RewardDance-style pairwise VLM judge (``vlm-pairwise``) on tiny random Qwen2-VL and LLaVA models
loaded through the real loader: its judgement equals softmax(logits)[Yes] at the answer position of a
two-image turn built by hand through the processor (image A first), the symmetric mode is the average of
both orders, gradients reach both images, and the registries send each kind of name to the right place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vlms import save_tiny_llava, save_tiny_qwen2_vl

import rewards
from rewards.vlm import DEFAULT_CRITERION, DEFAULT_PAIRWISE_QUESTION, PairwiseYesTokenJudge

FAMILIES = {"qwen2_vl": save_tiny_qwen2_vl, "llava": save_tiny_llava}
SIZES = {"qwen2_vl": (56, 84), "llava": (224, 224)}  # sizes the processor does not resize
YES = {"qwen2_vl": "Yes", "llava": "\u0120Yes"}  # "Yes" after "assistant\n"; " Yes" after "ASSISTANT:"
PROMPTS = ["a red square", "two cats on a long sofa"]  # different lengths: left padding
INSTRUCTION = "You are an expert judge of generated images.\n"


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairwise-vlms")
    return {family: str(build(root / family)) for family, build in FAMILIES.items()}


@pytest.fixture(scope="module")
def hand_models(vlm_dirs):
    """The model and processor of each folder, loaded by transformers directly (not through rewards)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return {
        family: (
            AutoModelForImageTextToText.from_pretrained(folder).eval(),
            AutoProcessor.from_pretrained(folder),
        )
        for family, folder in vlm_dirs.items()
    }


def uint8_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((count, height, width, 3)) * 255).round().astype(np.uint8)


def as_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def by_hand(
    hand: tuple, family: str, first: np.ndarray, second: np.ndarray, instruction: str | None = None
) -> torch.Tensor:
    """apply_chat_template on one user turn [instruction?, image, image, question], the processor on the
    two PIL images, the model's forward, softmax over the whole vocabulary at the last position, the
    probability of the first token of "Yes"."""
    model, processor = hand
    probabilities = []
    for image_1, image_2, prompt in zip(first, second, PROMPTS):
        question = DEFAULT_PAIRWISE_QUESTION.format(prompt=prompt, criterion=DEFAULT_CRITERION)
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": question}]
        if instruction is not None:
            content.insert(0, {"type": "text", "text": instruction})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        images = [[Image.fromarray(image_1), Image.fromarray(image_2)]]
        inputs = processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        yes = processor.tokenizer.convert_tokens_to_ids(YES[family])
        probabilities.append(torch.softmax(logits.float(), -1)[yes])
    return torch.stack(probabilities)


def close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    # P(Yes) of a random tiny model is ~3e-3, so an absolute 1e-5 would not tell the two orders apart
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_judgement_is_the_softmax_of_yes_after_both_images(vlm_dirs, hand_models, family):
    judge = rewards.load_pairwise("vlm-pairwise", pretrained=vlm_dirs[family])
    instructed = PairwiseYesTokenJudge(judge.vlm, instruction=INSTRUCTION)  # the same loaded VLM
    symmetric = PairwiseYesTokenJudge(judge.vlm, symmetric=True)
    hand = hand_models[family]
    assert isinstance(judge, rewards.PairwiseReward) and judge.info.name == "vlm-pairwise"
    assert judge.yes_token_id() == hand[1].tokenizer.convert_tokens_to_ids(YES[family])
    height, width = SIZES[family]
    a, b = uint8_images(2, height, width, seed=0), uint8_images(2, height, width, seed=1)
    with torch.no_grad():
        ours_ab, ours_ba = (
            judge(as_pixels(a), as_pixels(b), PROMPTS),
            judge(as_pixels(b), as_pixels(a), PROMPTS),
        )
        ours_instructed = instructed(as_pixels(a), as_pixels(b), PROMPTS)
        ours_symmetric = symmetric(as_pixels(a), as_pixels(b), PROMPTS)
    hand_ab, hand_ba = by_hand(hand, family, a, b), by_hand(hand, family, b, a)
    close(ours_ab, hand_ab)  # image A is image 1
    close(ours_ba, hand_ba)
    close(ours_instructed, by_hand(hand, family, a, b, instruction=INSTRUCTION))
    close(ours_symmetric, (hand_ab + 1 - hand_ba) / 2)  # P(A > B) and P(B > A) both asked
    # the checks above can tell the order of the images and the instruction apart
    tolerance = 1e-5 * hand_ab.max() + 1e-8
    assert (hand_ab - hand_ba).abs().max() > 10 * tolerance
    assert (ours_instructed - ours_ab).abs().max() > 10 * tolerance
    assert 0 < ours_ab.min() and ours_ab.max() < 1 and ours_ab.dtype == torch.float32

    assert judge.info.differentiable and symmetric.info.differentiable
    pixels_a, pixels_b = as_pixels(a).requires_grad_(True), as_pixels(b).requires_grad_(True)
    judge(pixels_a, pixels_b, PROMPTS).sum().backward()
    for grad in (pixels_a.grad, pixels_b.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_qwen2_vl_judges_two_videos_in_one_turn(vlm_dirs, hand_models):
    model, processor = hand_models["qwen2_vl"]
    judge = rewards.load_pairwise("vlm-pairwise", pretrained=vlm_dirs["qwen2_vl"])
    video_a, video_b = uint8_images(3, 56, 84, seed=2), uint8_images(3, 56, 84, seed=3)  # T x H x W x 3
    pixels_a, pixels_b = (
        torch.from_numpy(v).permute(3, 0, 1, 2)[None].float() / 255 for v in (video_a, video_b)
    )
    with torch.no_grad():
        ours = judge(pixels_a, pixels_b, PROMPTS[:1])
    question = DEFAULT_PAIRWISE_QUESTION.format(prompt=PROMPTS[0], criterion=DEFAULT_CRITERION)
    content = [{"type": "video"}, {"type": "video"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(text=[text], videos=[[video_a, video_b]], return_tensors="pt", do_sample_frames=False)
    with torch.no_grad():
        expected = torch.softmax(model(**inputs).logits[0, -1].float(), -1)[judge.yes_token_id()]
    close(ours, expected[None])


def test_inputs_are_validated(vlm_dirs):
    judge = rewards.load_pairwise("vlm-pairwise", pretrained=vlm_dirs["qwen2_vl"])
    a, b = torch.rand(2, 3, 56, 84), torch.rand(2, 3, 56, 84)
    with pytest.raises(rewards.RewardInputError, match="one shape"):
        judge(a, torch.rand(2, 3, 56, 112), PROMPTS)
    with pytest.raises(rewards.RewardInputError, match="one shape"):
        judge(a, b[:1], PROMPTS)
    with pytest.raises(rewards.RewardInputError, match="3 prompts for a batch of 2"):
        judge(a, b, PROMPTS + ["a dog"])
    with pytest.raises(rewards.RewardInputError, match="prompts must be a list"):
        judge(a, b)
    with pytest.raises(rewards.RewardInputError, match=r"lie in \[0, 1\]"):
        judge(a, b * 2, PROMPTS)
    with pytest.raises(rewards.RewardInputError, match="equally shaped batches"):
        judge.vlm.inputs((a, torch.rand(2, 3, 56, 112)), judge.texts(PROMPTS))
    with pytest.raises(rewards.RewardInputError, match=r"only \{prompt\} and \{criterion\}"):
        rewards.load_pairwise("vlm-pairwise", pretrained=vlm_dirs["qwen2_vl"], question="Is {image} better?")
    custom = rewards.load_pairwise(
        "vlm-pairwise",
        pretrained=vlm_dirs["qwen2_vl"],
        question="Is image 1 more {criterion} than image 2 for {prompt}? Answer yes or no.",
        criterion="colourful",
    )
    assert "Is image 1 more colourful than image 2 for a cat? Answer yes or no." in custom.texts(["a cat"])[0]
    assert not rewards.load_pairwise(
        "vlm-pairwise", pretrained=vlm_dirs["qwen2_vl"], question="Is image 1 sharper?"
    ).info.needs_prompt
    # reference mode: the reference is the second batch, broadcast over the samples
    reference = torch.rand(1, 3, 56, 84)
    with torch.no_grad():
        torch.testing.assert_close(
            judge(a, reference.expand_as(a), PROMPTS), judge(a, reference.repeat(2, 1, 1, 1), PROMPTS)
        )


def test_registries_send_each_kind_of_name_to_its_place(vlm_dirs):
    assert "vlm-pairwise" in rewards.pairwise_names()
    assert "vlm-pairwise" not in [info.name for info in rewards.list_rewards()]
    with pytest.raises(
        rewards.RewardInputError,
        match=r"'vlm-pairwise' is a pairwise judge.*grpo\.judge.*grpo\.comparison: pairwise-winrate.*vqascore",
    ):
        rewards.load_reward("vlm-pairwise")
    with pytest.raises(
        rewards.RewardInputError,
        match=r"'vqascore' is a pointwise reward.*vlm-pairwise.*pairwise-winrate.*PointwiseAsPairwise",
    ):
        rewards.load_pairwise("vqascore")
    with pytest.raises(rewards.RewardInputError, match="did you mean vlm-pairwise"):
        rewards.load_pairwise("vlm-pairwize")
    with pytest.raises(rewards.RewardInputError, match="has no option.*temperature.*symmetric"):
        rewards.load_pairwise("vlm-pairwise", pretrained=vlm_dirs["llava"], temperature=2.0)
    with pytest.raises(rewards.CheckpointNotFoundError, match="Qwen/Qwen2-VL-2B-Instruct"):
        rewards.load_pairwise("vlm-pairwise")
    judge = rewards.load_pairwise("vlm-pairwise", pretrained=vlm_dirs["llava"])
    assert rewards.require_pairwise(judge, "grpo.judge") is judge
    with pytest.raises(rewards.RewardInputError, match="grpo.comparison: pairwise-winrate"):
        rewards.require_pointwise(judge, "rewards")
    with pytest.raises(rewards.RewardInputError, match="already registered"):
        rewards.register_pairwise("vlm-pairwise", judge.info, lambda: judge)
