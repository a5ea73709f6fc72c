"""Stable Diffusion 3 / 3.5: an MMDiT flow transformer, two CLIP encoders and an optional T5.

Mirrors ``diffusers.StableDiffusion3Pipeline``: penultimate CLIP hidden states concatenated, padded
to the T5 width and stacked with the T5 sequence (zeros when the checkpoint is loaded without T5),
pooled embeddings of both CLIP encoders concatenated, the empty prompt as the unconditional branch,
and the scheduler's static shift or, with ``use_dynamic_shifting``, the resolution-dependent ``mu``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline

from pipelines.adapter import GeneratorAdapter, Guidance
from pipelines.embeds import PromptEmbeds

# Attention projections of both streams (the targets Flow-GRPO and diffusers' SD3 LoRA script use).
MMDIT_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def calculate_shift(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """``mu`` of the resolution-dependent time shift: linear in the number of image tokens (SD3.5, FLUX)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


class StableDiffusion3Adapter(GeneratorAdapter):
    family = "sd3"
    kind = "flow"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_guidance_scale = 7.0
    default_lora_targets = MMDIT_LORA_TARGETS
    denoiser_block_names = ("transformer_blocks",)
    default_max_sequence_length = 256
    uses_t5: bool | None = None  # set by load_pipeline(text_encoders=False); else: T5 is loaded or not

    def prompt_encoding(self) -> dict[str, Any]:
        t5 = self.uses_t5 if self.uses_t5 is not None else "text_encoder_3" in self.components
        return {**super().prompt_encoding(), "t5": t5}

    @property
    def size_multiple_extra(self) -> int:  # type: ignore[override]
        return int(self.denoiser_config.patch_size)

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        hidden, pooled = [], []
        clip_length = self.components["tokenizer"].model_max_length
        for suffix in ("", "_2"):
            tokenizer, text_encoder = (
                self.components[f"tokenizer{suffix}"],
                self.components[f"text_encoder{suffix}"],
            )
            out = text_encoder(self._tokenize(tokenizer, prompts, clip_length), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-((self.clip_skip or 0) + 2)])
        t5 = self._t5_embeds(prompts)
        clip = torch.cat(hidden, dim=-1).to(self.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(
            {
                "hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled": torch.cat(pooled, dim=-1).to(self.dtype),
            }
        )

    def _t5_embeds(self, prompts: list[str]) -> torch.Tensor:
        length = self.max_sequence_length or self.default_max_sequence_length
        if "text_encoder_3" not in self.components:
            width = self.denoiser_config.joint_attention_dim
            return torch.zeros(len(prompts), length, width, device=self.device, dtype=self.dtype)
        ids = self._tokenize(self.components["tokenizer_3"], prompts, length)
        return self.components["text_encoder_3"](ids)[0].to(self.dtype)

    def _schedule_kwargs(self, height: int, width: int, num_steps: int) -> dict[str, Any]:
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        patch = self.denoiser_config.patch_size
        tokens = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        return self.call_denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=embeds.hidden_states,
            pooled_projections=embeds.pooled,
            return_dict=False,
        )[0]
