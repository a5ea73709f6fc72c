"""Tiny random stand-ins of the real reward model classes, saved the way the real checkpoints are, so
the tests exercise the real loading code (``from_pretrained(folder)``, open_clip configs, .pt heads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_OPEN_CLIP = "vialign-tiny-ViT"
PROMPTS = [
    "a red square",
    "a photo of a cat on a sofa",
    "two dogs",
    "an astronaut riding a horse on the moon",
]


def clip_config(projection_dim: int = 32):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        image_size=224,
        patch_size=32,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_hf_clip(folder: Path, seed: int = 0, crop: int = 224) -> Path:
    """A transformers CLIPModel + CLIPProcessor (CLIP's real BPE vocabulary) in ``folder``."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipelines.tiny import clip_tokenizer

    torch.manual_seed(seed)
    model = CLIPModel(clip_config()).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}
        ),
        tokenizer=clip_tokenizer(),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def register_tiny_open_clip(folder: Path) -> str:
    """Register a tiny open_clip architecture (the same CLIP / VisionTransformer classes as ViT-H-14)."""
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP


def save_tiny_open_clip_weights(path: Path, seed: int = 0, hps_layout: bool = False) -> Path:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save({"state_dict": model.state_dict()} if hps_layout else model.state_dict(), path)
    return path


def save_tiny_aesthetic_head(path: Path, dim: int = 32, seed: int = 0) -> Path:
    from rewards.clip import AestheticMLP

    torch.manual_seed(seed)
    torch.save(AestheticMLP(dim).state_dict(), path)
    return path


def random_images(count: int = 16, seed: int = 0) -> list[np.ndarray]:
    """uint8 RGB images of varied sizes and aspect ratios, smooth with some texture (like real photos)."""
    generator = np.random.default_rng(seed)
    sizes = [
        (224, 224),
        (300, 200),
        (150, 400),
        (512, 256),
        (96, 64),
        (333, 517),
        (240, 320),
        (480, 360),
        (200, 200),
        (257, 129),
        (640, 427),
        (100, 300),
        (225, 225),
        (720, 1280),
        (181, 181),
        (64, 640),
    ]
    images = []
    for height, width in sizes[:count]:
        coarse = torch.from_numpy(generator.random((1, 3, 6, 6), dtype=np.float32))
        smooth = torch.nn.functional.interpolate(
            coarse, size=(height, width), mode="bilinear", align_corners=False
        )[0]
        texture = torch.from_numpy(generator.normal(0, 0.05, (3, height, width)).astype(np.float32))
        image = ((smooth + texture).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        images.append(image)
    return images


def to_pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255
