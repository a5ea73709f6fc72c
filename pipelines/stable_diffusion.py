"""Stable Diffusion 1.x / 2.x: a UNet predicting epsilon or v, one CLIP text encoder.

Mirrors ``diffusers.StableDiffusionPipeline``: prompts padded to 77 tokens, the text encoder's last
hidden state (or an earlier layer through the final layer norm with ``clip_skip``), CFG as one
``[uncond, cond]`` batch with the empty prompt as the unconditional branch.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.embeds import PromptEmbeds
from pipelines.errors import PipelineInputError

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as diffusers' LoRA scripts


class StableDiffusionAdapter(GeneratorAdapter):
    family = "sd"
    kind = "diffusion"
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    text_components = ("text_encoder",)
    default_guidance_scale = 7.5
    default_lora_targets = UNET_LORA_TARGETS
    denoiser_block_names = ("down_blocks", "mid_block", "up_blocks")

    def __init__(self, components: dict[str, Any], **options: Any) -> None:
        if components["unet"].config.get("time_cond_proj_dim") is not None:
            raise PipelineInputError(
                "guidance-distilled (LCM-style) UNets with time_cond_proj_dim are not supported"
            )
        super().__init__(components, **options)

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        tokenizer, text_encoder = self.components["tokenizer"], self.components["text_encoder"]
        ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length)
        if self.clip_skip is None:
            hidden = text_encoder(ids)[0]
        else:
            states = text_encoder(ids, output_hidden_states=True).hidden_states
            hidden = text_encoder.text_model.final_layer_norm(states[-(self.clip_skip + 1)])
        return PromptEmbeds({"hidden_states": hidden.to(self.dtype)})

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        return self.call_denoiser(x, t, encoder_hidden_states=embeds.hidden_states, return_dict=False)[0]
