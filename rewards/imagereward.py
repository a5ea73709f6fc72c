"""ImageReward (Xu et al., arXiv:2304.05977) on transformers' BLIP modules.

The published checkpoint (``THUDM/ImageReward``: ``ImageReward.pt``) is a BLIP ViT-L/16 image encoder,
a BERT-base text encoder with cross-attention to the image ("med"), and an MLP head. Its state dict
maps one-to-one onto ``BlipVisionModel`` and ``BlipTextModel`` (no tensor is split or reshaped): the
vision keys are renamed, the text keys already use the same BERT names, and the head is five linear
layers with no activation in between (the official code has its ReLUs commented out). The score:

    h     = text_encoder(tokens, cross-attending to ViT(image))[CLS]
    score = (MLP(h) - 0.16717362830052426) / 1.0333394966054072        (z-scored, as the official)

Preprocessing: shortest side to 224 (bicubic), centre crop 224, CLIP mean/std. Tokens:
``bert-base-uncased`` with ``[DEC]`` as BOS and ``[ENC]`` added (vocabulary 30524), padded to 35 and
truncated there; the sequence keeps ``[CLS]`` first (``[ENC]`` does not replace it in ImageReward).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import nn

from rewards import preprocess
from rewards.base import Reward, RewardInfo, RewardOutput
from rewards.checkpoints import load_pretrained, load_state_dict, resolve_file
from rewards.errors import RewardInputError

SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # the official z-scoring constants
MAX_TOKENS = 35  # ImageReward truncates prompts at 35 tokens
IMAGE_SIZE = 224
# BLIP's med_config.json (BERT-base with cross-attention), as shipped with ImageReward
MED_CONFIG = dict(
    vocab_size=30524,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
)
HEAD_LAYERS = (0, 2, 4, 6, 7)  # indices of the Linear layers in the checkpoint's nn.Sequential
VISION_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
UNUSED = {
    "blip.text_encoder.embeddings.position_ids",
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
}  # a buffer and BLIP's contrastive projections

INFO = RewardInfo(
    name="imagereward",
    description="ImageReward (Xu et al. 2023): BLIP fine-tuned on human preference rankings",
    differentiable=True,
    modality="image",
    scale="z-scored MLP output (mean 0.167, std 1.033 removed)",
    typical_range=(-2.0, 2.0),
    default_checkpoint="THUDM/ImageReward/ImageReward.pt + bert-base-uncased tokenizer",
)


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt keys -> (BlipVisionModel, BlipTextModel, head) state dicts; unknown keys are errors."""
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name in UNUSED:
            continue
        if name.startswith("blip.visual_encoder."):
            rest = name.removeprefix("blip.visual_encoder.")
            fixed = {
                "cls_token": "embeddings.class_embedding",
                "pos_embed": "embeddings.position_embedding",
                "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                "norm.weight": "post_layernorm.weight",
                "norm.bias": "post_layernorm.bias",
            }
            if rest in fixed:
                vision[fixed[rest]] = value
                continue
            match = re.fullmatch(
                r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", rest
            )
            if match is None:
                raise RewardInputError(f"ImageReward checkpoint has an unexpected vision key {key!r}")
            block, part, kind = match.groups()
            vision[f"encoder.layers.{block}.{VISION_BLOCK[part]}.{kind}"] = value
        elif name.startswith("blip.text_encoder."):
            text[name.removeprefix("blip.text_encoder.")] = value  # BERT names on both sides
        elif name.startswith("mlp.layers."):
            match = re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", name)
            if match is None or int(match.group(1)) not in HEAD_LAYERS:
                raise RewardInputError(f"ImageReward checkpoint has an unexpected head key {key!r}")
            head[f"layers.{HEAD_LAYERS.index(int(match.group(1)))}.{match.group(2)}"] = value
        else:
            raise RewardInputError(f"ImageReward checkpoint has an unexpected key {key!r}")
    return vision, text, head


class ImageRewardHead(nn.Module):
    """Five linear layers, no activations (an affine map, kept layer by layer to load the weights)."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            features = layer(features)
        return features.squeeze(-1)


class ImageReward(Reward):
    info = INFO

    def __init__(self, vision: nn.Module, text: nn.Module, head: ImageRewardHead, tokenizer: Any):
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> RewardOutput:
        dtype = next(self.vision.parameters()).dtype
        pixel_values = preprocess.clip_preprocess(pixels, IMAGE_SIZE, offsets="round").to(dtype)
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(image_embeds.device)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        raw = self.head(hidden[:, 0].to(next(self.head.parameters()).dtype)).float()
        return RewardOutput((raw - SCORE_MEAN) / SCORE_STD)


def imagereward_tokenizer(source: str | None) -> Any:
    """bert-base-uncased's WordPiece tokenizer with ImageReward's two extra tokens ([DEC], [ENC])."""
    from transformers import BertTokenizer

    tokenizer = load_pretrained(
        BertTokenizer.from_pretrained, source, default_id="bert-base-uncased", what="imagereward tokenizer"
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(
    *,
    pretrained: str | None = None,
    tokenizer: str | None = None,
    med_config: str | None = None,
    vision_heads: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
) -> ImageReward:
    """``pretrained``: ImageReward.pt (a file, a folder holding it, or a hub repo); ``tokenizer``: a folder
    with bert-base-uncased's vocab.txt (default: the hub's bert-base-uncased); ``med_config``: the text
    encoder's med_config.json (default: BLIP's, as published); ``vision_heads``: 16 for ViT-L."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    path = resolve_file(
        pretrained, repo_id="THUDM/ImageReward", filename="ImageReward.pt", what="imagereward"
    )
    vision_state, text_state, head_state = split_state_dict(load_state_dict(path))
    med = dict(MED_CONFIG)
    if med_config is not None:
        with open(med_config, encoding="utf-8") as f:
            med.update({k: v for k, v in json.load(f).items() if k in MED_CONFIG})
    width = int(vision_state["embeddings.class_embedding"].shape[-1])
    patch = int(vision_state["embeddings.patch_embedding.weight"].shape[-1])
    positions = int(vision_state["embeddings.position_embedding"].shape[1])
    layers = 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers."))
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=vision_heads,
        patch_size=patch,
        image_size=patch * round((positions - 1) ** 0.5),
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT
    )
    # is_decoder=True only makes BlipTextModel build its cross-attention layers; the forward runs as an encoder.
    text_config = BlipTextConfig(
        **med,
        encoder_hidden_size=width,
        is_decoder=True,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    vision = BlipVisionModel(vision_config)
    vision.load_state_dict(vision_state)
    text = BlipTextModel(text_config, add_pooling_layer=False)  # its forward defaults to is_decoder=False
    text.load_state_dict(text_state)
    sizes = [int(head_state["layers.0.weight"].shape[1])] + [
        int(head_state[f"layers.{i}.weight"].shape[0]) for i in range(len(HEAD_LAYERS))
    ]
    head = ImageRewardHead(sizes)
    head.load_state_dict(head_state)
    torch_dtype = getattr(torch, dtype)
    reward = ImageReward(vision, text, head, imagereward_tokenizer(tokenizer))
    reward.to(device=device, dtype=torch_dtype)
    reward.head.float()
    return reward.eval().requires_grad_(False)
