"""FLUX.1: a flow transformer on packed 2x2 latent patches, CLIP pooled + T5 sequence conditioning,
a distilled guidance embedding (dev) and a resolution-dependent time shift.

Mirrors ``diffusers.FluxPipeline``: sigmas ``linspace(1, 1/N, N)`` shifted with ``mu`` from the number
of packed image tokens, the transformer called at ``timestep / 1000`` with ``guidance_scale`` as the
guidance embedding (when the checkpoint has one), and "true" CFG with a negative prompt only when
``true_cfg_scale > 1``. Latents stay spatial outside this file; packing happens around the call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.embeds import PromptEmbeds
from pipelines.stable_diffusion_3 import MMDIT_LORA_TARGETS, calculate_shift

FLUX_LORA_TARGETS = MMDIT_LORA_TARGETS  # both streams' attention projections, as diffusers' FLUX LoRA script


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> B x (h/2 * w/2) x 4C: FLUX's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height x width``."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(row, column) position ids of the packed tokens of a ``height x width`` latent (halved)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(GeneratorAdapter):
    family = "flux"
    kind = "flow"
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    text_components = ("text_encoder", "text_encoder_2")
    default_guidance_scale = 3.5
    default_lora_targets = FLUX_LORA_TARGETS
    denoiser_block_names = ("transformer_blocks", "single_transformer_blocks")
    default_max_sequence_length = 512
    size_multiple_extra = 2  # 2x2 packing

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser_config.in_channels) // 4

    @property
    def stock_default_size(self) -> tuple[int, int]:
        size = 128 * self.vae_scale_factor  # FluxPipeline.default_sample_size
        return size, size

    def make_guidance(self, guidance_scale: float | None = None, true_cfg_scale: float = 1.0) -> Guidance:
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        embedded = scale if self.denoiser_config.guidance_embeds else None
        return Guidance(cfg_scale=float(true_cfg_scale), embedded=embedded)

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        tokenizer, clip = self.components["tokenizer"], self.components["text_encoder"]
        pooled = clip(
            self._tokenize(tokenizer, prompts, tokenizer.model_max_length), output_hidden_states=False
        ).pooler_output
        length = self.max_sequence_length or self.default_max_sequence_length
        t5_ids = self._tokenize(self.components["tokenizer_2"], prompts, length)
        hidden = self.components["text_encoder_2"](t5_ids, output_hidden_states=False)[0]
        return PromptEmbeds({"hidden_states": hidden.to(self.dtype), "pooled": pooled.to(self.dtype)})

    def _schedule_kwargs(self, height: int, width: int, num_steps: int) -> dict[str, Any]:
        config = self.scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        tokens = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": sigmas, "mu": mu}

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        embedded = None
        if self.denoiser_config.guidance_embeds:
            if guidance.embedded is None:
                raise ValueError(
                    "this FLUX transformer takes a guidance embedding: pass adapter.make_guidance(guidance_scale)"
                )
            embedded = torch.full((batch,), guidance.embedded, device=x.device, dtype=torch.float32)
        out = self.call_denoiser(
            hidden_states=pack_latents(x),
            timestep=t.to(x.dtype) / 1000,  # the transformer takes sigma; diffusers' timesteps are 1000 sigma
            guidance=embedded,
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.hidden_states,
            txt_ids=torch.zeros(embeds.hidden_states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=latent_image_ids(height, width, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)
