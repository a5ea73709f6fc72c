"""Wan2.1 text-to-video: a flow transformer over 1x2x2 patches of a causal video VAE's latents,
conditioned on UMT5 token embeddings.

Mirrors ``diffusers.WanPipeline``: prompts cleaned as the stock pipeline cleans them, padded to 512 UMT5
tokens, the encoder's states past each prompt's last token zeroed, CFG with ``guidance_scale`` (5) and
the negative prompt (empty by default) as the unconditional branch, x_0 drawn in float32 as
``B x 16 x F x H/8 x W/8`` with ``F = (num_frames - 1) / 4 + 1``, and latents un-normalised with the
VAE's per-channel ``latents_mean`` / ``latents_std`` before decoding.

Wan2.1 checkpoints ship ``UniPCMultistepScheduler`` (``flow_shift`` 3 for 480p, 5 for 720p); vialign
samples them with flow Euler (``FlowMatchEulerDiscreteScheduler``) at the same shift and says so in a
warning (``pipelines.schedules.stateless_scheduler``). Wan2.2's two-expert and TI2V checkpoints
(``transformer_2``, ``boundary_ratio``, ``expand_timesteps``) are refused.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from pipelines.adapter import Guidance, VideoGeneratorAdapter
from pipelines.embeds import PromptEmbeds
from pipelines.errors import PipelineInputError

logger = logging.getLogger(__name__)

# Self- and cross-attention projections of every block (the targets of diffusers' Wan LoRA examples).
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class WanAdapter(VideoGeneratorAdapter):
    family = "wan"
    kind = "flow"
    pipeline_class = WanPipeline
    denoiser_name = "transformer"
    text_components = ("text_encoder",)
    default_guidance_scale = 5.0
    default_lora_targets = WAN_LORA_TARGETS
    denoiser_block_names = ("blocks",)
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    default_num_frames = 81

    def __init__(self, components: dict[str, Any], **options: Any) -> None:
        config = options.get("pipeline_config") or {}
        wan22 = [
            name
            for name, present in (
                ("transformer_2", components.get("transformer_2") is not None),
                ("boundary_ratio", config.get("boundary_ratio") is not None),
                ("expand_timesteps", bool(config.get("expand_timesteps", False))),
            )
            if present
        ]
        if wan22:
            raise PipelineInputError(
                f"this WanPipeline has {', '.join(wan22)} (a Wan2.2 checkpoint); vialign supports Wan2.1 "
                "text-to-video checkpoints (one transformer), e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
            )
        if components.get("transformer") is None:
            raise PipelineInputError("this WanPipeline has no transformer; vialign needs one to sample")
        patch = tuple(components["transformer"].config.patch_size)
        if patch[0] != 1 or patch[1] != patch[2]:
            raise PipelineInputError(f"Wan transformers with patch_size {patch} are not supported (1, p, p)")
        super().__init__(components, **options)

    def to(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> WanAdapter:
        """As the base, but the transformer's ``_keep_in_fp32_modules`` (time embedding, norms, the
        modulation table) stay float32 under a half dtype, as ``WanPipeline.from_pretrained`` keeps them."""
        super().to(device, dtype)
        keep = set(getattr(self.unwrapped_denoiser, "_keep_in_fp32_modules", None) or ())
        if self.dtype != torch.float32 and keep:
            for name, tensor in [
                *self.unwrapped_denoiser.named_parameters(),
                *self.unwrapped_denoiser.named_buffers(),
            ]:
                if (
                    keep & set(name.split("."))
                    and tensor.is_floating_point()
                    and tensor.dtype != torch.float32
                ):
                    tensor.data = tensor.data.float()
        return self

    def _vae_spatial_factor(self) -> int:
        return int(self.vae.config.get("scale_factor_spatial") or 8)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.get("scale_factor_temporal") or 4)

    @property
    def size_multiple_extra(self) -> int:  # type: ignore[override]
        return int(self.denoiser_config.patch_size[1])

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser_config.in_channels)

    @property
    def stock_default_size(self) -> tuple[int, int]:
        return 480, 832  # WanPipeline's default height and width

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        tokenizer, encoder = self.components["tokenizer"], self.components["text_encoder"]
        length = self.max_sequence_length or self.default_max_sequence_length
        cleaned = [prompt_clean(p) for p in prompts]
        inputs = tokenizer(
            cleaned,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        if tokenizer(cleaned, padding="longest", return_tensors="pt").input_ids.shape[-1] > length:
            logger.warning("prompt(s) longer than %d tokens were truncated for %s", length, self.family)
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        hidden = encoder(ids, mask).last_hidden_state
        # the stock pipeline keeps each prompt's first (mask-count) states and pads with zeros
        kept = torch.arange(length, device=self.device)[None, :] < mask.gt(0).sum(dim=1)[:, None]
        hidden = torch.where(
            kept[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        return PromptEmbeds({"hidden_states": hidden.to(self.dtype)})

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        return self.call_denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=embeds.hidden_states,
            return_dict=False,
        )[0]
