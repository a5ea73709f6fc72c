"""CogVideoX (1.0: 2B and 5B) text-to-video: a diffusion transformer predicting v on the latents of a causal
video VAE (x8 space, x4 time), conditioned on T5 token embeddings.

Mirrors ``diffusers.CogVideoXPipeline``: prompts padded to 226 T5 tokens (all states kept, no mask), CFG as
one ``[uncond, cond]`` batch with ``guidance_scale`` (6) and the negative prompt (empty by default), x_0
drawn in the model's dtype as diffusers lays it out inside the pipeline (``B x F x C x h x w``), 3D rotary
position embeddings for the checkpoints that use them (5B), and latents divided by the VAE's
``scaling_factor`` before decoding. ``CogVideoXDDIMScheduler`` (v-prediction, SNR-shifted, zero terminal
SNR, "trailing" spacing) is DDIM on its own ``alphas_cumprod``, so vialign's DDIM steps reproduce it.

vialign keeps its one latent layout, ``B x C x F x h x w``: :meth:`CogVideoXAdapter._forward` permutes to
the transformer's ``B x F x C x h x w`` and back. The VAE decodes the latent frames after the first in
pairs, so a video has an odd number of latent frames: ``num_frames = 8k + 1`` (9, 17, ..., 49).
CogVideoX 1.5 (temporal patches, ``patch_size_t``) is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import CogVideoXPipeline
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

from pipelines.adapter import Guidance, VideoGeneratorAdapter
from pipelines.embeds import PromptEmbeds
from pipelines.errors import PipelineInputError

COGVIDEOX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' CogVideoX LoRA script's targets


class CogVideoXAdapter(VideoGeneratorAdapter):
    family = "cogvideox"
    kind = "diffusion"
    pipeline_class = CogVideoXPipeline
    denoiser_name = "transformer"
    text_components = ("text_encoder",)
    default_guidance_scale = 6.0
    default_lora_targets = COGVIDEOX_LORA_TARGETS
    denoiser_block_names = ("transformer_blocks",)
    default_max_sequence_length = 226
    default_num_frames = 49
    draw_noise_in_float32 = False  # prepare_latents draws in the prompt embeddings' (the model's) dtype

    def __init__(self, components: dict[str, Any], **options: Any) -> None:
        config = components["transformer"].config
        if config.get("patch_size_t") is not None or config.get("ofs_embed_dim") is not None:
            raise PipelineInputError(
                "this is a CogVideoX 1.5 transformer (temporal patches); vialign supports CogVideoX 1.0 "
                "text-to-video checkpoints, e.g. THUDM/CogVideoX-2b or THUDM/CogVideoX-5b"
            )
        length = options.get("max_sequence_length") or self.default_max_sequence_length
        if not config.use_rotary_positional_embeddings and length != config.max_text_seq_length:
            raise PipelineInputError(
                f"max_sequence_length={length}, but this CogVideoX transformer's position embeddings are laid "
                f"out for {config.max_text_seq_length} text tokens: use max_sequence_length="
                f"{config.max_text_seq_length}"
            )
        super().__init__(components, **options)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.temporal_compression_ratio)

    @property
    def size_multiple_extra(self) -> int:  # type: ignore[override]
        return int(self.denoiser_config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser_config.in_channels)

    @property
    def stock_default_size(self) -> tuple[int, int]:
        factor = self.vae_scale_factor
        return int(self.denoiser_config.sample_height) * factor, int(
            self.denoiser_config.sample_width
        ) * factor

    def check_frames(self, num_frames: int) -> None:
        super().check_frames(num_frames)
        t = self.temporal_factor
        if ((num_frames - 1) // t + 1) % 2 == 0:
            raise PipelineInputError(
                f"num_frames={num_frames} gives {(num_frames - 1) // t + 1} latent frames, but CogVideoX's VAE "
                f"decodes the latent frames after the first in pairs, so it needs an odd number: num_frames = "
                f"{2 * t}k+1; try {max(1, num_frames - t)} or {num_frames + t}"
            )

    def _latent_frames_to_decode(self, needed: int, total: int) -> int:
        # the VAE decodes latent frames [0, b + r), then b at a time (r = total % b), normalising each chunk
        # as a whole: decode up to the end of the chunk holding frame needed - 1
        b = int(getattr(self.vae, "num_latent_frames_batch_size", 2))
        first = b + total % b
        end = first + b * max(0, -(-(needed - first) // b))
        return min(end, total)

    def _draw_initial_noise(self, shape: tuple[int, ...], generator: Any) -> torch.Tensor:
        b, c, f, h, w = shape  # drawn in the pipeline's B x F x C x h x w order, for the same numbers
        noise = super()._draw_initial_noise((b, f, c, h, w), generator)
        return noise.permute(0, 2, 1, 3, 4)

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        tokenizer, encoder = self.components["tokenizer"], self.components["text_encoder"]
        length = self.max_sequence_length or self.default_max_sequence_length
        hidden = encoder(self._tokenize(tokenizer, prompts, length))[0]
        return PromptEmbeds({"hidden_states": hidden.to(self.dtype)})

    def _rotary_embeddings(self, frames: int, height: int, width: int, device: torch.device) -> Any:
        if not self.denoiser_config.use_rotary_positional_embeddings:
            return None
        config, patch = self.denoiser_config, self.denoiser_config.patch_size
        grid = (height // patch, width // patch)
        crops = get_resize_crop_region_for_grid(
            grid, config.sample_width // patch, config.sample_height // patch
        )
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim,
            crops_coords=crops,
            grid_size=grid,
            temporal_size=frames,
            device=device,
        )

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        _, _, frames, height, width = x.shape
        out = self.call_denoiser(
            hidden_states=x.permute(0, 2, 1, 3, 4).contiguous(),  # the transformer's B x F x C x h x w
            encoder_hidden_states=embeds.hidden_states,
            timestep=t,
            image_rotary_emb=self._rotary_embeddings(frames, height, width, x.device),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)
