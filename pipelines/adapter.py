"""The generator adapter: everything model-specific that sampling and training need, and no loop.

One subclass per model family (``stable_diffusion.py``, ``stable_diffusion_xl.py``,
``stable_diffusion_3.py``, ``flux.py``) fills in three things: how prompts are encoded, how the
denoiser is called at ``(x_t, t)``, and which schedule the stock pipeline would use. Everything else
lives here once: prompt caching, classifier-free guidance, initial noise drawn exactly as diffusers
draws it, VAE decode/encode, LoRA in the diffusers format, dtype/device placement and the attention
backend.

Latents are always the *spatial* VAE latents (``B x C x h x w``; ``B x C x F x h x w`` with a frame
axis for video models, see :class:`VideoGeneratorAdapter`), in float32: packing (FLUX) and the model's
dtype are applied inside :meth:`GeneratorAdapter.predict` and undone on the way out, so that step math
and log-probs see one layout for every family.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from pipelines.embeds import PromptCache, PromptEmbeds
from pipelines.errors import PipelineInputError
from pipelines.prediction import Prediction, convert_prediction
from pipelines.safetensors_io import load_checked, save_checked, verify_file
from pipelines.schedules import Schedule, diffusion_coefficients, schedule_from_scheduler, stateless_scheduler

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Guidance:
    """How a prediction is guided.

    ``cfg_scale``: classifier-free guidance ``u + s (c - u)`` from a conditional and an unconditional
    pass, used when it is greater than 1. ``embedded``: the guidance value that guidance-distilled
    models (FLUX.1-dev) take as an input embedding; ``None`` for models without one.
    """

    cfg_scale: float = 1.0
    embedded: float | None = None

    @property
    def uses_uncond(self) -> bool:
        return self.cfg_scale > 1.0


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PipelineInputError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineInputError(
            "device 'cuda' was asked for but torch sees no CUDA GPU; use device=cpu or auto"
        )
    return device


class GeneratorAdapter:
    """Shared behaviour of all families; subclasses set the class attributes and three methods.

    Subclasses implement ``_encode_prompts(prompts) -> PromptEmbeds``, ``_forward(x, t, embeds,
    guidance) -> Tensor`` (one denoiser call, model dtype in and out, spatial latents) and
    ``_schedule_kwargs(height, width, num_steps) -> dict`` (what the stock pipeline passes to
    ``set_timesteps``).
    """

    family: ClassVar[str]  # short name: "sd", "sdxl", "sd3", "flux"
    kind: ClassVar[Literal["flow", "diffusion"]]
    pipeline_class: ClassVar[type]  # the stock diffusers pipeline (its LoRA format is ours)
    denoiser_name: ClassVar[str]  # component name and LoRA prefix: "unet" or "transformer"
    text_components: ClassVar[tuple[str, ...]]  # text encoder component names
    default_guidance_scale: ClassVar[float]  # the stock pipeline's default guidance_scale
    default_lora_targets: ClassVar[tuple[str, ...]]
    # the denoiser's repeated blocks, by attribute name (a module list or one module): the units a trainer
    # shards one by one (FSDP), see :meth:`denoiser_blocks`
    denoiser_block_names: ClassVar[tuple[str, ...]] = ()
    size_multiple_extra: ClassVar[int] = 1  # patch size / packing factor on top of the VAE factor
    is_video: ClassVar[bool] = False  # video families: latents B x C x F x h x w (VideoGeneratorAdapter)
    default_num_steps: int = 20  # a model folder's vialign.json may set its own
    stored_default_size: tuple[int, int] | None = None  # a model folder's vialign.json "size": [h, w]
    # components load_pipeline(text_encoders=False) left unloaded, and its from_pretrained options: an
    # export (save_pipeline) reads them again from the source
    omitted_components: tuple[str, ...] = ()
    source_options: dict[str, Any] | None = None

    def __init__(
        self,
        components: dict[str, Any],
        *,
        model_id: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        attention: Literal["auto", "sdpa", "xformers"] = "auto",
        pipeline_config: dict[str, Any] | None = None,
        max_sequence_length: int | None = None,
        clip_skip: int | None = None,
    ) -> None:
        self.components = {name: c for name, c in components.items() if c is not None}
        self.model_id = model_id
        self.pipeline_config = dict(pipeline_config or {})
        self.max_sequence_length = max_sequence_length
        self.clip_skip = clip_skip
        self.vae = components["vae"]
        self.denoiser: nn.Module = components[self.denoiser_name]
        # kept apart from the module: a trainer may replace ``denoiser`` by a wrapped (e.g. DDP) module
        self.denoiser_config = self.denoiser.config
        self.scheduler = stateless_scheduler(components["scheduler"], self.kind)
        self.vae_scale_factor = self._vae_spatial_factor()
        self.prompt_cache = PromptCache(model_id)
        self.cache_prompts = True
        self.compile_options: dict[str, Any] | None = None  # set by compile_for_inference
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(module) -> (module, compiled)
        for module in self.modules().values():
            module.eval()
            module.requires_grad_(False)
        self.to(device, dtype)
        self.attention = self._set_attention(attention)

    def _vae_spatial_factor(self) -> int:
        """Pixels per latent along height and width (2 ** the VAE's downsampling blocks)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ placement
    @classmethod
    def from_pipeline(cls, pipe: Any, *, model_id: str, **options: Any) -> GeneratorAdapter:
        """Adapter over the components of a loaded diffusers pipeline (the pipeline is not kept)."""
        return cls(dict(pipe.components), model_id=model_id, pipeline_config=dict(pipe.config), **options)

    def modules(self) -> dict[str, nn.Module]:
        """Every torch module of the model, by component name."""
        return {n: c for n, c in self.components.items() if isinstance(c, nn.Module)}

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def unwrapped_denoiser(self) -> nn.Module:
        """The denoiser itself, also while a trainer has put a wrapper (DDP) in ``denoiser``."""
        return self.components[self.denoiser_name]

    def denoiser_blocks(self) -> list[nn.Module]:
        """The denoiser's blocks in forward order (UNet down, mid and up blocks; a transformer's blocks):
        the modules a sharded trainer gathers one at a time (``vialign.sharding``). A name the model lacks
        (an attribute that is None) is skipped."""
        blocks: list[nn.Module] = []
        for name in self.denoiser_block_names:
            value = getattr(self.unwrapped_denoiser, name, None)
            if isinstance(value, (nn.ModuleList, nn.Sequential)):
                blocks.extend(value)
            elif isinstance(value, nn.Module):
                blocks.append(value)
        return blocks

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's (and text encoders') compute dtype."""
        return self._dtype

    def to(
        self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> GeneratorAdapter:
        """Move every module; the VAE stays float32 when fp16 would overflow it (``force_upcast``)."""
        self._device = resolve_device(device) if device is not None else self._device
        self._dtype = resolve_dtype(dtype) if dtype is not None else self._dtype
        for name, module in self.modules().items():
            module_dtype = self._dtype
            if name == "vae" and self._dtype == torch.float16 and self.vae.config.get("force_upcast", True):
                module_dtype = torch.float32
            current = next(module.parameters(), None)
            if current is not None and current.dtype != module_dtype:
                module.to(dtype=module_dtype)
            module.to(device=self._device)
        # LoRA master weights stay float32 whatever the base dtype.
        for name, param in self.unwrapped_denoiser.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        return self

    def _set_attention(self, attention: str) -> str:
        if attention not in ("auto", "sdpa", "xformers"):
            raise PipelineInputError(f"unknown attention backend {attention!r}; use auto, sdpa or xformers")
        xformers_ok = self.device.type == "cuda" and _xformers_available()
        if attention == "xformers" and not xformers_ok:
            raise PipelineInputError(
                "attention='xformers' needs a CUDA device and the xformers package "
                "(pip install 'vialign[xformers]'); use attention='sdpa' (the default on CPU)"
            )
        if attention == "sdpa" or (attention == "auto" and not xformers_ok):
            return "sdpa"  # diffusers' default processors call torch's scaled_dot_product_attention
        try:
            self.denoiser.enable_xformers_memory_efficient_attention()
        except Exception as error:  # noqa: BLE001 - reported, not swallowed, when asked for explicitly
            if attention == "xformers":
                raise PipelineInputError(
                    f"xformers attention could not be enabled for {self.family}: {error}"
                ) from error
            logger.info("xformers is installed but not usable for %s (%s); using SDPA", self.family, error)
            return "sdpa"
        return "xformers"

    # ------------------------------------------------------------------ prompts
    @property
    def has_text_encoders(self) -> bool:
        """False for a model loaded without its text encoders (``load_pipeline(text_encoders=False)``):
        its prompts come from precomputed embeddings (:meth:`load_prompt_embeds`) only."""
        return any(name in self.components for name in self.text_components)

    def prompt_encoding(self) -> dict[str, Any]:
        """What decides a prompt's embedding besides the model: recorded in a file of precomputed
        embeddings, which a model whose encoding differs refuses to load."""
        length = self.max_sequence_length or getattr(self, "default_max_sequence_length", None)
        return {
            "family": self.family,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_sequence_length": length,
            "clip_skip": self.clip_skip,
        }

    def encode_prompt(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Encode ``prompts`` (cached per prompt in memory unless ``cache_prompts`` is False); without text
        encoders, the prompts' rows of the loaded prompt-embedding files."""
        prompts = _check_prompts(prompts)
        if not self.cache_prompts and self.has_text_encoders:
            with torch.no_grad():
                return self._encode_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.prompt_cache))
        if missing and not self.has_text_encoders:
            files = ", ".join(self.prompt_cache.files) or "none loaded"
            raise PipelineInputError(
                f"{len(missing)} prompt(s) have no precomputed embedding, e.g. {missing[0]!r}, and this "
                f"{self.family} model was loaded without its text encoders (prompt-embedding files: {files}): "
                "add them to the file (vialign precompute-embeds, or precompute_prompt_embeds on the model "
                "loaded with its text encoders)"
            )
        with torch.no_grad():
            # One prompt per encoder call: a batched matmul's last bits depend on the batch's size and
            # company, so batching would make a prompt's row depend on which step first needed it, and a
            # resumed run (or another process) would not reproduce an uninterrupted one bitwise.
            for prompt in missing:
                self.prompt_cache.put([prompt], self._encode_prompts([prompt]))
        return self.prompt_cache.get(prompts).to(self.device)

    def uncond_embeds(self, batch_size: int, negative_prompt: str | None = None) -> PromptEmbeds:
        """The unconditional branch of CFG, as the stock pipeline builds it (empty or negative prompt)."""
        return self.encode_prompt([negative_prompt or ""] * batch_size)

    def precompute_prompt_embeds(
        self, prompts: Sequence[str], path: str | os.PathLike, batch_size: int = 32, shard_size: int = 1024
    ) -> int:
        """Encode ``prompts`` and write them for training runs, with :meth:`prompt_encoding` in the metadata.
        Each prompt is encoded alone, as :meth:`encode_prompt` always does, so a row is bitwise the
        embedding a run would compute.

        ``path`` ending in ``.safetensors``: one file of ``prompts`` (those not cached yet are encoded; all
        rows pass through memory). Any other ``path`` is a folder of files of ``shard_size`` prompts each
        (``prompts-00000.safetensors``, ...), written one at a time, so memory holds one file's rows: the
        prompts a folder already holds are kept and not encoded again, the others go to new files.
        Returns how many of ``prompts`` the file or folder holds."""
        unique = list(dict.fromkeys(_check_prompts(prompts)))
        if os.fspath(path).endswith(".safetensors"):
            for start in range(0, len(unique), batch_size):
                self.encode_prompt(unique[start : start + batch_size])
            self.prompt_cache.save(path, unique, self.prompt_encoding())
            return len(unique)
        from pipelines.embeds import SHARD_PATTERN

        os.makedirs(path, exist_ok=True)
        held = PromptCache(self.model_id)
        if any(name.endswith(".safetensors") for name in os.listdir(path)):
            held.load(path, encoding=self.prompt_encoding())  # same model and encoding, or an error
        todo = [p for p in unique if p not in held]
        number = len([name for name in os.listdir(path) if name.endswith(".safetensors")])
        for start in range(0, len(todo), shard_size):
            shard = PromptCache(self.model_id)
            for prompt in todo[start : start + shard_size]:
                if prompt in self.prompt_cache:
                    shard.put([prompt], self.prompt_cache.get([prompt]))
                else:
                    shard.put([prompt], self._encode_uncached(prompt))
            while os.path.exists(os.path.join(path, SHARD_PATTERN.format(number))):
                number += 1
            shard.save(os.path.join(path, SHARD_PATTERN.format(number)), encoding=self.prompt_encoding())
        return len(unique)

    def _encode_uncached(self, prompt: str) -> PromptEmbeds:
        if not self.has_text_encoders:
            self.encode_prompt([prompt])  # the error naming the missing prompt
        with torch.no_grad():
            return self._encode_prompts([prompt])

    def load_prompt_embeds(self, path: str | os.PathLike) -> int:
        """Make the prompts of a file written by :meth:`precompute_prompt_embeds` available to
        :meth:`encode_prompt` (read from the file when used); returns how many it holds."""
        return self.prompt_cache.load(path, encoding=self.prompt_encoding())

    def _encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
        """Token ids padded to ``max_length``, as every stock pipeline does; warns on truncation."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] > ids.shape[-1]:
            logger.warning(
                "prompt(s) longer than %d tokens were truncated for %s", max_length, type(tokenizer).__name__
            )
        return ids.to(self.device)

    # ------------------------------------------------------------------ geometry and noise
    def check_size(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * self.size_multiple_extra
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                lower = (
                    max(multiple, (int(value) // multiple) * multiple) if isinstance(value, int) else multiple
                )
                raise PipelineInputError(
                    f"{name}={value} is not a positive multiple of {multiple} for this {self.family} model "
                    f"(VAE factor {self.vae_scale_factor}"
                    + (f" x patch/packing {self.size_multiple_extra}" if self.size_multiple_extra > 1 else "")
                    + f"); try {lower} or {lower + multiple}"
                )

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's spatial latent for an image of ``height x width`` pixels."""
        self.check_size(height, width)
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) when none is given: the model folder's own (``vialign.json``'s ``size``), else
        the stock pipeline's."""
        return self.stored_default_size or self.stock_default_size

    @property
    def stock_default_size(self) -> tuple[int, int]:
        """(height, width) that the stock pipeline uses when none is given."""
        size = int(self.denoiser_config.sample_size) * self.vae_scale_factor
        return size, size

    def initial_latents(
        self,
        generator: torch.Generator | list[torch.Generator] | None,
        batch_size: int,
        height: int,
        width: int,
        schedule: Schedule,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """x_0 ~ N(0, I) drawn exactly as the stock pipeline draws it for ``generator`` (float32).

        A list of generators draws each sample from its own generator, so a sample does not depend on
        the batch it is drawn in. ``num_frames`` is for video models only.
        """
        _refuse_frames(self, "num_frames", num_frames)
        shape = (batch_size, *self.latent_shape(height, width))
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        return noise.float() * schedule.init_noise_scale

    def schedule(self, num_steps: int, height: int, width: int) -> Schedule:
        """The stock pipeline's sampling schedule at this size, as plain tensors."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise PipelineInputError(f"num_steps must be a positive integer, got {num_steps!r}")
        self.check_size(height, width)
        return schedule_from_scheduler(
            self.scheduler, num_steps, **self._schedule_kwargs(height, width, num_steps)
        )

    def _schedule_kwargs(self, height: int, width: int, num_steps: int) -> dict[str, Any]:
        return {}

    # scheduler config keys a recipe may change, per model kind
    SCHEDULE_OVERRIDES = {
        "flow": ("shift",),
        "diffusion": ("beta_start", "beta_end", "beta_schedule", "timestep_spacing"),
    }

    def override_scheduler(self, **changes: Any) -> None:
        """Sample (and train) with a changed noise schedule: ``changes`` are scheduler config keys.

        Flow models take a static ``shift``, which also turns off the resolution-dependent shift that SD3.5
        and FLUX use (``use_dynamic_shifting``): DanceGRPO samples FLUX at shift 3 whatever the size.
        Diffusion models take ``beta_start``, ``beta_end``, ``beta_schedule`` and ``timestep_spacing``
        (e.g. ``trailing``). None values are ignored.
        """
        changes = {key: value for key, value in changes.items() if value is not None}
        allowed = self.SCHEDULE_OVERRIDES[self.kind]
        wrong = sorted(set(changes) - set(allowed))
        if wrong:
            raise PipelineInputError(
                f"{wrong[0]} does not apply to {type(self).__name__} ({self.kind} model); its scheduler "
                f"takes {', '.join(allowed)}"
            )
        if not changes:
            return
        if "shift" in changes:
            changes["use_dynamic_shifting"] = False
        self.scheduler = type(self.scheduler).from_config(self.scheduler.config, **changes)

    # ------------------------------------------------------------------ the denoiser
    @property
    def prediction_type(self) -> str:
        """What the denoiser outputs: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``."""
        return "flow" if self.kind == "flow" else self.scheduler.config.prediction_type

    def make_guidance(self, guidance_scale: float | None = None, true_cfg_scale: float = 1.0) -> Guidance:
        """The family's meaning of the stock pipeline's ``guidance_scale`` (CFG for all but FLUX)."""
        if true_cfg_scale != 1.0:
            raise PipelineInputError(
                f"true_cfg_scale is FLUX's; for {self.family} guidance_scale already is classifier-free guidance"
            )
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        return Guidance(cfg_scale=scale)

    def predict(
        self,
        latents: torch.Tensor,
        timestep: float | torch.Tensor,
        cond: PromptEmbeds,
        guidance: Guidance = Guidance(),
        uncond: PromptEmbeds | None = None,
    ) -> torch.Tensor:
        """The (guided) denoiser output at ``(latents, timestep)``, float32, in ``prediction_type`` units.

        ``timestep`` is in the schedule's units (``Schedule.timesteps``): a scalar or one per sample.
        With ``guidance.cfg_scale > 1`` the conditional and unconditional passes run as one batch
        ``[uncond, cond]``, as the stock pipelines do.
        """
        batch = latents.shape[0]
        if len(cond) != batch:
            raise ValueError(f"{len(cond)} prompt embeddings for a batch of {batch} latents")
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.device)
        t = t.expand(batch) if t.ndim == 0 else t
        x = latents.to(device=self.device, dtype=self.dtype)
        if not guidance.uses_uncond:
            return self._forward(x, t, cond, guidance).float()
        if uncond is None or len(uncond) != batch:
            raise ValueError(
                f"cfg_scale={guidance.cfg_scale} needs unconditional embeddings for all {batch} samples"
            )
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]), PromptEmbeds.cat([uncond, cond]), guidance)
        out_uncond, out_cond = out.float().chunk(2)
        return out_uncond + guidance.cfg_scale * (out_cond - out_uncond)

    def _forward(
        self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, guidance: Guidance
    ) -> torch.Tensor:
        raise NotImplementedError

    def compile_for_inference(self, **options: Any) -> None:
        """Run the denoiser ``torch.compile``d (``options``: its keyword arguments, e.g. ``mode``) wherever
        no gradient is taken: rollouts, sampling, evaluation. Calls under autograd stay eager, so training
        losses, gradient checkpointing and LoRA updates see the module itself; a compiled module reads the
        current weights on every call, so updated or swapped-in weights need no recompiling."""
        self.compile_options = dict(options)
        self._compiled.clear()

    def call_denoiser(self, *args: Any, **kwargs: Any) -> Any:
        """``self.denoiser(*args, **kwargs)``, through its compiled twin when :meth:`compile_for_inference`
        was asked for and no gradient is being taken. ``denoiser`` may be swapped (a reference model, a
        wrapper); each module gets its own compiled twin, made on first use."""
        module = self.denoiser
        if self.compile_options is None or torch.is_grad_enabled():
            return module(*args, **kwargs)
        entry = self._compiled.get(id(module))
        if entry is None or entry[0] is not module:
            entry = (module, torch.compile(module, **self.compile_options))
            self._compiled[id(module)] = entry
        return entry[1](*args, **kwargs)

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) at training ``timesteps`` (schedule units, one per sample), for training
        losses at a given t: ``x_t = alpha_t x0 + sigma_t eps``. Flow: sigma = t / T; diffusion: the
        cumulative alpha product at integer t."""
        timesteps = torch.as_tensor(timesteps, device=self.device)
        if self.kind == "flow":
            sigma = timesteps.float() / self.scheduler.config.num_train_timesteps
            return 1.0 - sigma, sigma
        return diffusion_coefficients(self.scheduler, timesteps)

    def convert(self, output: torch.Tensor, latents: torch.Tensor, alpha: Any, sigma: Any) -> Prediction:
        """x0_hat / eps_hat (and ``.velocity``) of a :meth:`predict` output at coefficients (alpha, sigma)."""
        return convert_prediction(output, latents, alpha, sigma, self.prediction_type)

    # ------------------------------------------------------------------ VAE
    def decode(
        self, latents: torch.Tensor, *, checkpoint: bool = False, frames: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Pixels in [0, 1], float32, ``B x 3 x H x W``; differentiable. ``checkpoint`` recomputes the
        decoder in the backward pass instead of storing its activations. ``frames`` is for video models."""
        _refuse_frames(self, "frames", frames)
        if checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        z = latents.to(device=self.device, dtype=self.vae.dtype)
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std / config.scaling_factor + mean
        else:
            z = z / config.scaling_factor
            if config.get("shift_factor") is not None:
                z = z + config.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True
    ) -> torch.Tensor:
        """Latents (float32) of pixels in [0, 1] (``B x 3 x H x W``): the VAE posterior's sample, or its
        mode with ``sample=False``, scaled as the denoiser expects."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise PipelineInputError(f"encode expects pixels shaped B x 3 x H x W, got {tuple(pixels.shape)}")
        if pixels.min() < 0 or pixels.max() > 1:
            raise PipelineInputError(
                f"encode expects pixels in [0, 1], got values in [{pixels.min().item():.3f}, {pixels.max().item():.3f}]"
            )
        self.check_size(int(pixels.shape[-2]), int(pixels.shape[-1]))
        config = self.vae.config
        posterior = self.vae.encode((pixels * 2 - 1).to(device=self.device, dtype=self.vae.dtype)).latent_dist
        z = (posterior.sample(generator) if sample else posterior.mode()).float()
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean, device=z.device).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=z.device).view(1, -1, 1, 1)
            return (z - mean) * config.scaling_factor / std
        if config.get("shift_factor") is not None:
            z = z - config.shift_factor
        return z * config.scaling_factor

    # ------------------------------------------------------------------ LoRA (diffusers format)
    def add_lora(
        self,
        rank: int = 16,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> Any:
        """Attach a peft LoRA to the denoiser (float32 master weights, trainable); returns its config."""
        from peft import LoraConfig

        if rank < 1:
            raise PipelineInputError(f"LoRA rank must be >= 1, got {rank}")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            target_modules=list(target_modules or self.default_lora_targets),
            lora_dropout=dropout,
            init_lora_weights=True,
        )
        try:
            self.unwrapped_denoiser.add_adapter(config, adapter_name=adapter_name)
        except ValueError as error:
            raise PipelineInputError(f"could not attach LoRA to the {self.denoiser_name}: {error}") from error
        self.to()
        for param in self.lora_parameters(adapter_name):
            param.requires_grad_(True)
        return config

    def lora_parameters(self, adapter_name: str = "default") -> list[nn.Parameter]:
        return [
            p
            for n, p in self.unwrapped_denoiser.named_parameters()
            if "lora_" in n and f".{adapter_name}." in n
        ]

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> str:
        """Write the LoRA so that stock ``pipe.load_lora_weights(directory)`` loads it; returns the file.

        The file is written to a temporary name and renamed, so an interrupted save never leaves a
        truncated ``pytorch_lora_weights.safetensors`` behind.
        """
        from peft.utils import get_peft_model_state_dict

        peft_config = getattr(self.unwrapped_denoiser, "peft_config", {}).get(adapter_name)
        if peft_config is None:
            raise PipelineInputError(f"the {self.denoiser_name} has no LoRA adapter named {adapter_name!r}")
        # peft's lora_A / lora_B keys, prefixed with the component name by save_lora_weights: the layout
        # diffusers' own LoRA training scripts write for SD3 and FLUX, and that its loaders read for all.
        state = get_peft_model_state_dict(self.unwrapped_denoiser, adapter_name=adapter_name)
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-lora-") as tmp:
            self.pipeline_class.save_lora_weights(
                tmp,
                safe_serialization=True,
                **{
                    f"{self.denoiser_name}_lora_layers": state,
                    f"{self.denoiser_name}_lora_adapter_metadata": peft_config.to_dict(),
                },
            )
            # re-written with vialign's checksum in the header (diffusers ignores the extra key), so that
            # a LoRA damaged on disk is refused when read instead of loading wrong weights
            tensors, metadata = load_checked(os.path.join(tmp, LORA_WEIGHT_NAME), "LoRA weights")
            target = os.path.join(directory, LORA_WEIGHT_NAME)
            save_checked(tensors, target, metadata)
        return target

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load a diffusers-format LoRA (a folder with ``pytorch_lora_weights.safetensors`` or the file)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            folder, weight_name = path, LORA_WEIGHT_NAME
        else:
            folder, weight_name = os.path.dirname(path) or ".", os.path.basename(path)
        if not os.path.isfile(os.path.join(folder, weight_name)):
            raise PipelineInputError(f"no LoRA weights at {os.path.join(folder, weight_name)}")
        verify_file(os.path.join(folder, weight_name), "LoRA weights")
        self.unwrapped_denoiser.load_lora_adapter(
            folder, weight_name=weight_name, prefix=self.denoiser_name, adapter_name=adapter_name
        )
        self.to()

    def save_pipeline(self, directory: str | os.PathLike) -> None:
        """Write the whole model as a stock diffusers pipeline folder (safetensors), atomically: into a
        temporary folder next to ``directory``, renamed into place when complete."""
        import inspect

        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory):
            raise PipelineInputError(f"{directory} already exists; choose a new folder")
        parameters = inspect.signature(self.pipeline_class.__init__).parameters
        components = {name: self.components.get(name) for name in parameters if name != "self"}
        if self.omitted_components:  # loaded without its text encoders: read them for the export only
            from pipelines.loading import load_components

            options = dict(self.source_options or {}, dtype=self.dtype)
            components.update(load_components(self.model_id, self.omitted_components, **options))
        components = {
            n: c for n, c in components.items() if c is not None or parameters[n].default is inspect._empty
        }
        if "requires_safety_checker" in parameters:
            components["requires_safety_checker"] = False
        pipe = self.pipeline_class(**components)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent, prefix=".tmp-pipeline-") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            os.replace(tmp, directory)
            os.makedirs(tmp)  # TemporaryDirectory removes it on exit

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """The base model: LoRA adapters off inside the block (the reference policy of KL terms)."""
        if not getattr(self.unwrapped_denoiser, "_hf_peft_config_loaded", False):
            yield
            return
        self.unwrapped_denoiser.disable_adapters()
        try:
            yield
        finally:
            self.unwrapped_denoiser.enable_adapters()


class VideoGeneratorAdapter(GeneratorAdapter):
    """What video families (``wan.py``, ``cogvideox.py``) share: a frame axis in latents and pixels.

    Latents are ``B x C x F x h x w`` float32 whatever layout the denoiser takes inside ``_forward``;
    pixels are ``B x F x 3 x H x W`` in [0, 1]. The VAEs compress time causally by ``temporal_factor``
    (t): latent frame 0 holds pixel frame 0 alone and latent frame i > 0 holds pixel frames
    t(i-1)+1 ... ti, so a video has ``t k + 1`` frames and ``k + 1`` latent frames. Decoding is causal
    too, which :meth:`decode` uses to decode only the latent frames that the asked-for frames need.
    """

    is_video = True
    default_num_frames: int  # the stock pipeline's num_frames default; a vialign.json may set its own
    draw_noise_in_float32: ClassVar[bool] = True  # stock x_0 dtype: float32, else the model's dtype

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame (after the first)."""
        raise NotImplementedError

    def check_frames(self, num_frames: int) -> None:
        t = self.temporal_factor
        valid = isinstance(num_frames, int) and not isinstance(num_frames, bool)
        if valid and num_frames >= 1 and (num_frames - 1) % t == 0:
            return
        lower = max(1, (int(num_frames) - 1) // t * t + 1) if valid else 1
        raise PipelineInputError(
            f"num_frames={num_frames!r} is not {t}k+1 for this {self.family} model (its VAE keeps the first "
            f"frame alone and compresses the others {t}x in time); try {lower} or {lower + t}"
        )

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a ``num_frames`` video."""
        self.check_frames(num_frames)
        return (num_frames - 1) // self.temporal_factor + 1

    def pixel_frames(self, latent_frames: int) -> int:
        """Frames of the video that ``latent_frames`` latent frames decode to."""
        return self.temporal_factor * (latent_frames - 1) + 1

    def latent_index(self, frame: int) -> int:
        """The latent frame that pixel frame ``frame`` is decoded from (with the ones before it)."""
        return 0 if frame == 0 else (frame - 1) // self.temporal_factor + 1

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's latent (``C x F x h x w``); ``num_frames`` defaults to ``default_num_frames``."""
        self.check_size(height, width)
        frames = self.latent_frames(self.default_num_frames if num_frames is None else num_frames)
        return (self.latent_channels, frames, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def initial_latents(
        self,
        generator: torch.Generator | list[torch.Generator] | None,
        batch_size: int,
        height: int,
        width: int,
        schedule: Schedule,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """x_0 ~ N(0, I), ``B x C x F x h x w``, drawn exactly as the stock pipeline's ``prepare_latents``
        draws it for ``generator`` (float32); ``num_frames`` defaults to ``default_num_frames``."""
        shape = (batch_size, *self.latent_shape(height, width, num_frames))
        return self._draw_initial_noise(shape, generator).float() * schedule.init_noise_scale

    def _draw_initial_noise(self, shape: tuple[int, ...], generator: Any) -> torch.Tensor:
        dtype = torch.float32 if self.draw_noise_in_float32 else self.dtype
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

    def decode(
        self, latents: torch.Tensor, *, checkpoint: bool = False, frames: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Video in [0, 1], float32, ``B x F x 3 x H x W``; differentiable. ``checkpoint`` recomputes the
        decoder in the backward pass instead of storing its activations.

        ``frames``: only these frames (indices into the decoded video, in the order given). The decoder is
        causal in time, so it runs over the latent frames up to the one the last asked-for frame comes
        from and no further: ``frames=[0]`` decodes latent frame 0 alone (Wan), frame ``j > 0`` needs latent
        frames 0 .. (j - 1) // t + 1, rounded up to the VAE's own decoding chunks where it normalises
        several latent frames together (CogVideoX: [0, 3), then pairs). Time and activation memory grow
        with the latent frames decoded.
        """
        if latents.ndim != 5:
            raise PipelineInputError(
                f"decode expects video latents B x C x F x h x w, got shape {tuple(latents.shape)}"
            )
        self.check_frames(self.pixel_frames(int(latents.shape[2])))  # e.g. CogVideoX: an odd F only
        if frames is not None:
            count = self.pixel_frames(int(latents.shape[2]))
            frames = list(frames)
            bad = [f for f in frames if isinstance(f, bool) or int(f) != f or not 0 <= int(f) < count]
            if not frames or bad:
                raise PipelineInputError(
                    f"frames must be indices in 0..{count - 1} of the {count}-frame video these latents decode "
                    f"to, got {bad[:3] if bad else 'none'}"
                )
            frames = [int(f) for f in frames]
            needed = max(self.latent_index(f) for f in frames) + 1
            latents = latents[:, :, : self._latent_frames_to_decode(needed, int(latents.shape[2]))]
        if checkpoint and torch.is_grad_enabled():
            video = torch.utils.checkpoint.checkpoint(self._decode_video, latents, use_reentrant=False)
        else:
            video = self._decode_video(latents)
        return video if frames is None else video[:, frames]

    def _latent_frames_to_decode(self, needed: int, total: int) -> int:
        """How many leading latent frames to decode so that the first ``needed`` come out exactly as in a
        decode of all ``total``: ``needed`` for a VAE that decodes one latent frame at a time (Wan)."""
        return needed

    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._vae_space(latents.to(device=self.device, dtype=self.vae.dtype))
        video = self.vae.decode(z, return_dict=False)[0]  # B x 3 x F x H x W in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    def encode(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, *, sample: bool = True
    ) -> torch.Tensor:
        """Latents (float32, ``B x C x F x h x w``) of a video in [0, 1] (``B x F x 3 x H x W``): the VAE
        posterior's sample, or its mode with ``sample=False``, normalised as the denoiser expects."""
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise PipelineInputError(
                f"encode expects videos shaped B x F x 3 x H x W, got {tuple(pixels.shape)}"
            )
        if pixels.min() < 0 or pixels.max() > 1:
            raise PipelineInputError(
                f"encode expects pixels in [0, 1], got values in [{pixels.min().item():.3f}, {pixels.max().item():.3f}]"
            )
        self.check_frames(int(pixels.shape[1]))
        self.check_size(int(pixels.shape[-2]), int(pixels.shape[-1]))
        video = (pixels * 2 - 1).permute(0, 2, 1, 3, 4).to(device=self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(video).latent_dist
        return self._model_space((posterior.sample(generator) if sample else posterior.mode()).float())

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        config = self.vae.config
        view = (1, -1) + (1,) * (z.ndim - 2)
        scaling = float(config.get("scaling_factor") or 1.0)  # Wan's VAE has none: mean/std only
        if config.get("latents_mean") is None or config.get("latents_std") is None:
            return None, None, scaling
        mean = torch.tensor(config.latents_mean, device=z.device, dtype=z.dtype).view(view)
        std = torch.tensor(config.latents_std, device=z.device, dtype=z.dtype).view(view)
        return mean, std, scaling

    def _vae_space(self, z: torch.Tensor) -> torch.Tensor:
        """The denoiser's (normalised) latents -> the VAE decoder's input."""
        mean, std, scaling = self._latent_stats(z)
        if mean is None:
            return z / scaling
        return z * std / scaling + mean

    def _model_space(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's latents -> the denoiser's (normalised) latents."""
        mean, std, scaling = self._latent_stats(z)
        if mean is None:
            return z * scaling
        return (z - mean) * scaling / std


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise PipelineInputError("prompts must be a list of strings, got a single string")
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise PipelineInputError(f"prompts must be strings, got {type(bad[0]).__name__}")
    if not prompts:
        raise PipelineInputError("no prompts given")
    return prompts


def _refuse_frames(adapter: GeneratorAdapter, name: str, value: Any) -> None:
    if value is not None:
        raise PipelineInputError(
            f"{name} is for video models; {adapter.family} generates images: leave {name} unset"
        )


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True
