"""The ShapeWorld testbed's models: configs of the tiny VAE, CLIP, flow transformer and UNet, and how
they are assembled into standard diffusers pipeline folders.

Sizes (32 x 32 RGB images, 4 x 8 x 8 latents) are chosen so that everything trains from scratch on a
2-core CPU within the hour and the shipped folders stay small (weights stored in float16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
TEXT_TOKENS = 16  # CLIP context: ShapeWorld prompts take at most 11 tokens
T5_TOKENS = 8  # SD3 appends this many zero "T5" tokens (the testbed has no T5)
CLIP_MERGES = 5000  # the first 5000 merges of CLIP's BPE: every ShapeWorld word is 1-3 tokens
TEXT_WIDTH, TEXT_PROJECTION = 64, 64
MODEL_DEFAULTS = {"guidance_scale": 4.0, "num_steps": 20, "max_sequence_length": T5_TOKENS, "use_t5": False}


def tokenizer() -> Any:
    from pipelines.tiny import clip_tokenizer

    return clip_tokenizer(num_merges=CLIP_MERGES, model_max_length=TEXT_TOKENS)


def vae() -> Any:
    """x4 AutoencoderKL: 3 x 32 x 32 <-> 4 x 8 x 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def clip(vocab_size: int) -> Any:
    """A tiny CLIP: the reward model, and the source of the generators' text encoder."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_PROJECTION))


def flow_transformer() -> Any:
    """SD3-class MMDiT on 8 x 8 latents, patch 2 (16 image tokens), 4 joint blocks of width 128."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_PROJECTION,
        pos_embed_max_size=8,
    )


def unet() -> Any:
    """SD-class UNet (epsilon prediction) on 8 x 8 latents with cross-attention to the CLIP text states."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def text_encoders(clip_model: Any) -> tuple[Any, Any]:
    """(CLIPTextModel, CLIPTextModelWithProjection) holding the CLIP's text tower."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_model.config.text_config
    plain, projected = (
        CLIPTextModel(config),
        CLIPTextModelWithProjection(
            config.__class__(**{**config.to_dict(), "projection_dim": clip_model.config.projection_dim})
        ),
    )
    plain.load_state_dict(
        clip_model.text_model.state_dict()
    )  # transformers 5: CLIPTextModel is the transformer
    projected.text_model.load_state_dict(clip_model.text_model.state_dict())
    projected.text_projection.load_state_dict(clip_model.text_projection.state_dict())
    return plain.eval(), projected.eval()


def latent_scaled_vae(vae_model: Any, scaling_factor: float, shift_factor: float | None) -> Any:
    """A copy of the testbed VAE whose config carries the latent normalisation the pipelines apply."""
    from diffusers import AutoencoderKL

    vae_copy = AutoencoderKL.from_config(
        {**vae_model.config, "scaling_factor": scaling_factor, "shift_factor": shift_factor}
    )
    vae_copy.load_state_dict(vae_model.state_dict())
    return vae_copy.eval()


def flow_pipeline(
    vae_model: Any, clip_model: Any, transformer: Any, tok: Any, latent_mean: float, latent_std: float
) -> Any:
    """A StableDiffusion3Pipeline (both CLIP slots hold the testbed's text encoder; no T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    _, projected = text_encoders(clip_model)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=latent_scaled_vae(vae_model, 1.0 / latent_std, latent_mean),
        text_encoder=projected,
        tokenizer=tok,
        text_encoder_2=projected,
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def unet_pipeline(vae_model: Any, clip_model: Any, unet_model: Any, tok: Any, latent_std: float) -> Any:
    """A StableDiffusionPipeline with SD 1.5's DDIM schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines.tiny import SD_SCHEDULER

    plain, _ = text_encoders(clip_model)
    return StableDiffusionPipeline(
        unet=unet_model,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        vae=latent_scaled_vae(vae_model, 1.0 / latent_std, None),
        text_encoder=plain,
        tokenizer=tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Any, folder: Path, defaults: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` in float16 safetensors, plus vialign's sampling defaults in vialign.json."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(torch.float32)
    (folder / "vialign.json").write_text(json.dumps(defaults or MODEL_DEFAULTS, indent=2) + "\n")


def save_clip(clip_model: Any, tok: Any, folder: Path, head: dict[str, Any]) -> None:
    """The reward model: CLIPModel + CLIPProcessor (float16) and its calibration (reward_config.json).
    A video CLIP (``head["frames"]`` frames stacked as channels) gets the normalisation once per frame."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    clip_model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    clip_model.to(torch.float32)
    frames = int(head.get("frames", 1))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=list(OPENAI_CLIP_MEAN) * frames,
            image_std=list(OPENAI_CLIP_STD) * frames,
        ),
        tokenizer=tok,
    )
    processor.save_pretrained(folder)
    (folder / "reward_config.json").write_text(json.dumps(head, indent=2) + "\n")
