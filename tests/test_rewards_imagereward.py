"""ImageReward on transformers' BLIP modules, against an independent plain-torch implementation of the
original model that reads the checkpoint's own key names (BLIP ViT + "med" BERT with cross-attention +
the linear head), on a tiny random checkpoint saved in the original layout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_rewards import random_images, to_pixels

import rewards
from rewards.imagereward import SCORE_MEAN, SCORE_STD
from rewards.preprocess import clip_preprocess

VISION = dict(width=48, layers=2, heads=4, patch=32, mlp=96)  # 224 / 32 = 7 x 7 patches
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=40,
    max_position_embeddings=64,
)
WORDS = ["a", "red", "square", "photo", "of", "cat", "on", "the", "moon", "dog", "two", "blue", "##s"]


def original_layout_checkpoint(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's key names (BLIP repo layout)."""

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    w, p, h = VISION["width"], VISION["patch"], TEXT["hidden_size"]
    state = {
        "blip.visual_encoder.cls_token": t(1, 1, w),
        "blip.visual_encoder.pos_embed": t(1, 50, w),
        "blip.visual_encoder.patch_embed.proj.weight": t(w, 3, p, p, scale=0.02),
        "blip.visual_encoder.patch_embed.proj.bias": t(w),
        "blip.visual_encoder.norm.weight": 1 + t(w),
        "blip.visual_encoder.norm.bias": t(w),
        "blip.text_encoder.embeddings.position_ids": torch.arange(64)[None],
        "blip.vision_proj.weight": t(8, w),
        "blip.vision_proj.bias": t(8),
    }
    for i in range(VISION["layers"]):
        b = f"blip.visual_encoder.blocks.{i}"
        state.update(
            {
                f"{b}.norm1.weight": 1 + t(w),
                f"{b}.norm1.bias": t(w),
                f"{b}.norm2.weight": 1 + t(w),
                f"{b}.norm2.bias": t(w),
                f"{b}.attn.qkv.weight": t(3 * w, w),
                f"{b}.attn.qkv.bias": t(3 * w),
                f"{b}.attn.proj.weight": t(w, w),
                f"{b}.attn.proj.bias": t(w),
                f"{b}.mlp.fc1.weight": t(VISION["mlp"], w),
                f"{b}.mlp.fc1.bias": t(VISION["mlp"]),
                f"{b}.mlp.fc2.weight": t(w, VISION["mlp"]),
                f"{b}.mlp.fc2.bias": t(w),
            }
        )
    e = "blip.text_encoder.embeddings"
    state.update(
        {
            f"{e}.word_embeddings.weight": t(TEXT["vocab_size"], h),
            f"{e}.position_embeddings.weight": t(64, h),
            f"{e}.LayerNorm.weight": 1 + t(h),
            f"{e}.LayerNorm.bias": t(h),
        }
    )
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}"
        for attention, kv in (("attention", h), ("crossattention", w)):
            a = f"{layer}.{attention}"
            state.update(
                {
                    f"{a}.self.query.weight": t(h, h),
                    f"{a}.self.query.bias": t(h),
                    f"{a}.self.key.weight": t(h, kv),
                    f"{a}.self.key.bias": t(h),
                    f"{a}.self.value.weight": t(h, kv),
                    f"{a}.self.value.bias": t(h),
                    f"{a}.output.dense.weight": t(h, h),
                    f"{a}.output.dense.bias": t(h),
                    f"{a}.output.LayerNorm.weight": 1 + t(h),
                    f"{a}.output.LayerNorm.bias": t(h),
                }
            )
        state.update(
            {
                f"{layer}.intermediate.dense.weight": t(64, h),
                f"{layer}.intermediate.dense.bias": t(64),
                f"{layer}.output.dense.weight": t(h, 64),
                f"{layer}.output.dense.bias": t(h),
                f"{layer}.output.LayerNorm.weight": 1 + t(h),
                f"{layer}.output.LayerNorm.bias": t(h),
            }
        )
    sizes = [h, 20, 12, 8, 4, 1]
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"] = t(b, a, scale=0.5), t(b)
    return state


def reference_score(sd, pixel_values, input_ids, attention_mask):
    """The original model's forward in plain torch, from the original key names."""

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def heads(x, n):
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    def attend(q, k, v, n, mask=None):
        scores = heads(q, n) @ heads(k, n).transpose(-1, -2) / (q.shape[-1] // n) ** 0.5
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(-1) @ heads(v, n)).transpose(1, 2).flatten(2)

    v = "blip.visual_encoder"
    x = (
        F.conv2d(
            pixel_values,
            sd[f"{v}.patch_embed.proj.weight"],
            sd[f"{v}.patch_embed.proj.bias"],
            stride=VISION["patch"],
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([sd[f"{v}.cls_token"].expand(len(x), -1, -1), x], 1) + sd[f"{v}.pos_embed"]
    for i in range(VISION["layers"]):
        b = f"{v}.blocks.{i}"
        q, k, val = lin(ln(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, val, VISION["heads"]), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image = ln(x, f"{v}.norm", 1e-6)
    e = "blip.text_encoder"
    y = (
        sd[f"{e}.embeddings.word_embeddings.weight"][input_ids]
        + sd[f"{e}.embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    )
    y = ln(y, f"{e}.embeddings.LayerNorm", 1e-12)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"{e}.encoder.layer.{i}"
        for attention, memory, m in (("attention", None, mask), ("crossattention", image, None)):
            a = f"{layer}.{attention}"
            kv = y if memory is None else memory
            out = attend(
                lin(y, f"{a}.self.query"),
                lin(kv, f"{a}.self.key"),
                lin(kv, f"{a}.self.value"),
                TEXT["num_attention_heads"],
                m,
            )
            y = ln(lin(out, f"{a}.output.dense") + y, f"{a}.output.LayerNorm", 1e-12)
        y = ln(
            lin(F.gelu(lin(y, f"{layer}.intermediate.dense")), f"{layer}.output.dense") + y,
            f"{layer}.output.LayerNorm",
            1e-12,
        )
    h = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        h = lin(h, f"mlp.layers.{index}")
    return (h.squeeze(-1) - SCORE_MEAN) / SCORE_STD


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    state = original_layout_checkpoint(torch.Generator().manual_seed(0))
    torch.save(state, root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(TEXT))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text(
        "\n".join(vocab + [f"[unused{i}]" for i in range(38 - len(vocab))]) + "\n"
    )
    return root, state


def test_imagereward_matches_the_original_model(checkpoint):
    root, state = checkpoint
    reward = rewards.load_reward(
        "imagereward",
        pretrained=str(root / "ImageReward.pt"),
        tokenizer=str(root / "tokenizer"),
        med_config=str(root / "med_config.json"),
        vision_heads=VISION["heads"],
    )
    assert len(reward.tokenizer) == 40 and reward.tokenizer.convert_tokens_to_ids("[ENC]") == 39
    prompts = ["a red square", "two dogs on the moon", "a photo of a cat", "blue squares"]
    images = random_images(4)
    with torch.no_grad():
        ours = torch.cat([reward(to_pixels(image), [prompt]).score for image, prompt in zip(images, prompts)])
        tokens = reward.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        assert tokens.input_ids.shape == (4, 35) and (tokens.input_ids[:, 0] == 2).all()  # [CLS] stays first
        pixel_values = torch.cat([clip_preprocess(to_pixels(image)) for image in images])
        expected = reference_score(state, pixel_values, tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert ours.std() > 0.01  # the prompts/images give different scores: the comparison is not vacuous

    pixels = to_pixels(images[0]).requires_grad_(True)
    reward(pixels, ["a red square"]).score.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_unexpected_checkpoint_keys_are_refused(checkpoint, tmp_path):
    _, state = checkpoint
    torch.save({**state, "blip.itm_head.weight": torch.zeros(2, 2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(rewards.RewardInputError, match="unexpected key 'blip.itm_head.weight'"):
        rewards.load_reward("imagereward", pretrained=str(tmp_path / "ImageReward.pt"))
