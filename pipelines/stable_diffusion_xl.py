"""Stable Diffusion XL: a UNet with added time/text conditioning and two CLIP text encoders.

Mirrors ``diffusers.StableDiffusionXLPipeline``: the penultimate hidden states of both encoders
concatenated, the second encoder's projected embedding as ``text_embeds``, ``time_ids`` =
(original size, crop top-left (0, 0), target size) = the generated size, and zero unconditional
embeddings when the checkpoint sets ``force_zeros_for_empty_prompt`` and no negative prompt is given.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.embeds import PromptEmbeds
from pipelines.stable_diffusion import UNET_LORA_TARGETS


class StableDiffusionXLAdapter(GeneratorAdapter):
    family = "sdxl"
    kind = "diffusion"
    pipeline_class = StableDiffusionXLPipeline
    denoiser_name = "unet"
    text_components = ("text_encoder", "text_encoder_2")
    default_guidance_scale = 5.0
    default_lora_targets = UNET_LORA_TARGETS
    denoiser_block_names = ("down_blocks", "mid_block", "up_blocks")

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, pooled = [], None
        for suffix in ("", "_2"):
            tokenizer, text_encoder = (
                self.components[f"tokenizer{suffix}"],
                self.components[f"text_encoder{suffix}"],
            )
            ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length)
            out = text_encoder(ids, output_hidden_states=True)
            if (
                pooled is None and out[0].ndim == 2
            ):  # the projected (pooled) embedding of the encoder that has one
                pooled = out[0]
            hidden.append(out.hidden_states[-((self.clip_skip or 0) + 2)])
        return PromptEmbeds(
            {"hidden_states": torch.cat(hidden, dim=-1).to(self.dtype), "pooled": pooled.to(self.dtype)}
        )

    def uncond_embeds(self, batch_size: int, negative_prompt: str | None = None) -> PromptEmbeds:
        if negative_prompt is None and self.pipeline_config.get("force_zeros_for_empty_prompt", True):
            like = self.encode_prompt([""])
            return PromptEmbeds(
                {n: torch.zeros_like(t).expand(batch_size, *t.shape[1:]) for n, t in like.items()}
            )
        return super().uncond_embeds(batch_size, negative_prompt)

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        height, width = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor(
            [[height, width, 0, 0, height, width]], device=x.device, dtype=embeds.hidden_states.dtype
        )
        added = {"text_embeds": embeds.pooled, "time_ids": time_ids.expand(x.shape[0], -1)}
        return self.call_denoiser(
            x, t, encoder_hidden_states=embeds.hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]
