"""Tiny random pipelines of every family, built offline from configs in code.

They are real diffusers pipelines (the same classes as SD 1.5, SDXL, SD3, FLUX and Wan2.1, a few
hundred thousand parameters each, tens of thousands for Wan), so tests and the quickstart exercise the real code paths:
``build("sd3").save_pretrained(dir)`` then ``pipelines.load_pipeline(dir)`` is the loading code a
real checkpoint goes through. Tokenizers are built in code too: CLIP's from the real BPE vocabulary
that ``open_clip`` ships, T5's as a small Unigram vocabulary. Weights are seeded, so a given
``(family, seed)`` always gives the same model. Every module is ``.eval()``-ed.

Names accepted by :func:`pipelines.load_pipeline`: ``tiny-sd``, ``tiny-sd-v`` (v-prediction, like
SD 2.x), ``tiny-sd-euler``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-wan`` (text-to-video;
it ships ``FlowMatchEulerDiscreteScheduler(shift=3)`` where real Wan2.1 checkpoints ship UniPC, so the
stock pipeline loaded from its folder samples exactly as vialign does), ``tiny-cogvideox`` (text-to-video,
CogVideoX-5B's rotary embeddings and CogVideoX-2B's scheduler config).
"""

from __future__ import annotations

import gzip
import string
from functools import lru_cache
from typing import Any

import torch

FAMILIES = ("sd", "sd-v", "sd-euler", "sdxl", "sd3", "flux", "wan", "cogvideox")
TINY_IMAGE_SIZE = 64  # pixels; latents are 8 x 8 with the x8 VAE below

# SD 1.5's scheduler config (scheduler_config.json of runwayml/stable-diffusion-v1-5, as DDIM).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)
# SDXL base's EulerDiscreteScheduler config.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


@lru_cache(maxsize=4)
def _clip_bpe(num_merges: int | None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of OpenAI CLIP's BPE, read from the file open_clip ships."""
    import open_clip.tokenizer as oc_tokenizer

    with gzip.open(oc_tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # the slice CLIP uses
    if num_merges is not None:
        merges = merges[:num_merges]
    byte_chars = list(oc_tokenizer.bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(num_merges: int | None = None, model_max_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` with OpenAI CLIP's vocabulary (49408 tokens when complete).

    ``num_merges`` keeps only the first merges (a smaller vocabulary of ``514 + num_merges`` tokens)
    for models that must stay very small.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe(num_merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512, extra_words: tuple[str, ...] = ()) -> Any:
    """A small T5 (Unigram) tokenizer: T5's special tokens, characters and a few common words (and
    ``extra_words``, each then one token)."""
    from transformers import T5Tokenizer

    words = ["a", "an", "the", "of", "on", "in", "and", "with", "photo", "red", "green", "blue", "cat", "dog"]
    words += [w for w in extra_words if w not in words]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -3.0) for w in words]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [("\u2581" + c, -5.0) for c in chars] + [(c, -6.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_text_config(hidden: int = 32, projection: int = 32, vocab_size: int = 49408) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu",
    )


def t5_encoder(d_model: int, vocab_size: int, *, umt5: bool = False, d_kv: int = 8, d_ff: int = 37) -> Any:
    """A 2-layer T5 encoder (SD3's, FLUX's, CogVideoX's class) or, with ``umt5``, UMT5 encoder (Wan2.1's)
    of width ``d_model``, randomly initialised."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return model_class(config)


def wan_transformer(
    *, heads: int, head_dim: int, channels: int, text_dim: int, freq_dim: int, ffn_dim: int, layers: int
) -> Any:
    """A ``WanTransformer3DModel`` with Wan2.1's layout (1x2x2 patches, cross-attention norm, RMS q/k norm
    across heads) at the given size: the tiny Wan here and the video testbed's generator."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=channels,
        out_channels=channels,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _wan_components() -> dict[str, Any]:
    """Wan2.1's architecture at toy width: 1x2x2 patches, UMT5 text, a causal 3D VAE (x8 space, x4 time)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    transformer = wan_transformer(
        heads=2, head_dim=12, channels=16, text_dim=32, freq_dim=256, ffn_dim=32, layers=2
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    tokenizer = t5_tokenizer()
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=t5_encoder(32, len(tokenizer), umt5=True),
        tokenizer=tokenizer,
        transformer_2=None,
    )


def _cogvideox_components() -> dict[str, Any]:
    """CogVideoX 1.0 at toy width: 2x2 patches, T5 text, a causal 3D VAE (x8 space, x4 time)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=True,  # as CogVideoX-5B
    )
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=32,
        sample_width=32,
    )
    # THUDM/CogVideoX-2b's scheduler_config.json
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    tokenizer = t5_tokenizer()
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=t5_encoder(32, len(tokenizer)),
        tokenizer=tokenizer,
    )


def _vae(latent_channels: int = 4, **config: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
        **config,
    )


def tiny_components(family: str, seed: int = 0) -> dict[str, Any]:
    """The components of a tiny ``family`` pipeline (seeded random weights, eval mode)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    latent = TINY_IMAGE_SIZE // 8
    torch.manual_seed(seed)
    if family in ("sd", "sd-v", "sd-euler"):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = _vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_clip_text_config())
        prediction = "v_prediction" if family == "sd-v" else "epsilon"
        if family == "sd-euler":
            scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER, prediction_type=prediction)
        else:
            scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction)
        components = dict(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip_tokenizer(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
        )
    elif family == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=latent,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + text_encoder_2 projection
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        vae = _vae(scaling_factor=0.13025)
        components = dict(
            unet=unet,
            vae=vae,
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
            text_encoder=CLIPTextModel(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer_2=clip_tokenizer(),
            image_encoder=None,
            feature_extractor=None,
        )
    elif family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=latent,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=32,
        )
        vae = _vae(
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        )
        t5_tok = t5_tokenizer()
        components = dict(
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
            tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5_encoder(64, len(t5_tok)),
            tokenizer_3=t5_tok,
            image_encoder=None,
            feature_extractor=None,
        )
    elif family == "wan":
        components = _wan_components()
    elif family == "cogvideox":
        components = _cogvideox_components()
    else:  # flux
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = _vae(
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        )
        t5_tok = t5_tokenizer()
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        components = dict(
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder=CLIPTextModel(_clip_text_config()),
            tokenizer=clip_tokenizer(),
            text_encoder_2=t5_encoder(32, len(t5_tok)),
            tokenizer_2=t5_tok,
            image_encoder=None,
            feature_extractor=None,
        )
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return components


def pipeline_class(family: str) -> type:
    from diffusers import (
        CogVideoXPipeline,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        WanPipeline,
    )

    return {
        "sd": StableDiffusionPipeline,
        "sd-v": StableDiffusionPipeline,
        "sd-euler": StableDiffusionPipeline,
        "sdxl": StableDiffusionXLPipeline,
        "sd3": StableDiffusion3Pipeline,
        "flux": FluxPipeline,
        "wan": WanPipeline,
        "cogvideox": CogVideoXPipeline,
    }[family]


def build(family: str, seed: int = 0) -> Any:
    """A tiny stock diffusers pipeline of ``family`` (e.g. ``build("flux").save_pretrained(dir)``)."""
    cls = pipeline_class(family)
    components = tiny_components(family, seed)
    if cls.__name__ == "StableDiffusionPipeline":
        return cls(**components, requires_safety_checker=False)
    return cls(**components)
