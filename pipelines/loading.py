"""``load_pipeline``: a diffusers checkpoint (hub id or local folder) or a built-in name -> adapter.

The adapter is chosen from ``_class_name`` in the checkpoint's ``model_index.json``; the components are
loaded by that stock pipeline class's own ``from_pretrained`` (so hub ids, local folders, variants and
subfolders behave exactly as in diffusers), then handed to the adapter.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.adapter import GeneratorAdapter, resolve_device, resolve_dtype
from pipelines.cogvideox import CogVideoXAdapter
from pipelines.errors import ModelNotFoundError, PipelineInputError
from pipelines.flux import FluxAdapter
from pipelines.stable_diffusion import StableDiffusionAdapter
from pipelines.stable_diffusion_3 import StableDiffusion3Adapter
from pipelines.stable_diffusion_xl import StableDiffusionXLAdapter
from pipelines.wan import WanAdapter

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[GeneratorAdapter]] = {
    "StableDiffusionPipeline": StableDiffusionAdapter,
    "StableDiffusionXLPipeline": StableDiffusionXLAdapter,
    "StableDiffusion3Pipeline": StableDiffusion3Adapter,
    "FluxPipeline": FluxAdapter,
    "WanPipeline": WanAdapter,
    "CogVideoXPipeline": CogVideoXAdapter,
}
BUILTIN_PREFIX = "tiny-"
# Shipped pretrained testbed models (assets/shapeworld, installed as the package vialign_assets).
SHIPPED = {
    "shapeworld": ("shapeworld", "flow"),
    "shapeworld-unet": ("shapeworld", "unet"),
    "shapeworld-video": ("shapeworld_video", "wan"),
}
DEFAULTS_FILE = "vialign.json"  # sampling defaults a model folder may carry (guidance_scale, num_steps, ...)


def supported_pipelines() -> list[str]:
    """The diffusers pipeline classes ``load_pipeline`` accepts."""
    return list(ADAPTERS)


def builtin_models() -> list[str]:
    """Names that load without a download: the shipped testbed models and tiny random pipelines."""
    from pipelines.tiny import FAMILIES

    return [*SHIPPED, *(BUILTIN_PREFIX + family for family in FAMILIES)]


def shipped_model_path(name: str) -> str:
    """Folder of a shipped model (``shapeworld``, ``shapeworld-unet``, ``shapeworld-video``)."""
    import vialign_assets

    folder = vialign_assets.path(*SHIPPED[name])
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the shipped model {name!r} is missing from {folder}; reinstall vialign, or rebuild it with "
            f"python -m vialign.testbed.{'video' if name == 'shapeworld-video' else 'build'}"
        )
    return str(folder)


def stored_size(defaults: dict[str, Any]) -> tuple[int, int] | None:
    """The default (height, width) a model folder's ``vialign.json`` stores as ``"size": [h, w]``, or None."""
    size = defaults.get("size")
    if size is None:
        return None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise PipelineInputError(
            f'{DEFAULTS_FILE}: "size" must be [height, width] in pixels (two positive integers), got {size!r}; '
            "fix or delete the key"
        )
    return int(size[0]), int(size[1])


def model_defaults(path_or_id: str) -> dict[str, Any]:
    """Sampling defaults stored with a model folder (``vialign.json``), or {}."""
    folder = shipped_model_path(path_or_id) if path_or_id in SHIPPED else path_or_id
    file = os.path.join(folder, DEFAULTS_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def read_model_index(path_or_id: str) -> dict[str, Any]:
    """The ``model_index.json`` of a local folder or a hub id (from the cache when offline)."""
    if os.path.isdir(path_or_id):
        index_file = os.path.join(path_or_id, "model_index.json")
        if not os.path.isfile(index_file):
            raise ModelNotFoundError(
                f"{path_or_id} is a folder but has no model_index.json, so it is not a diffusers pipeline folder "
                "(write one with pipe.save_pretrained(folder))"
            )
        with open(index_file, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as error:
                raise PipelineInputError(f"{index_file} is not valid JSON: {error}") from error
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise ModelNotFoundError(
            f"model {path_or_id!r} not found: no such folder. Pass a diffusers pipeline folder, a Hugging Face "
            f"hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a built-in name ({', '.join(builtin_models())})"
        )
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path_or_id))
    except Exception as error:  # noqa: BLE001 - hub errors come in many classes; all mean "cannot get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache can load; "
            if offline
            else "the hub could not be reached or has no such model; "
        )
        raise ModelNotFoundError(
            f"model {path_or_id!r} not found: it is not a local folder, and {hint}download it on a machine "
            f"with access (huggingface-cli download {path_or_id}) or pass a local folder. Built-in models: "
            f"{', '.join(builtin_models())}"
        ) from error


@dataclass(frozen=True)
class ModelPreview:
    """What a model's id and its small JSON files tell before any weight is read (:func:`preview_model`)."""

    adapter_class: type[GeneratorAdapter]
    defaults: dict[str, Any]  # its vialign.json ({} for built-ins and hub ids)
    # a stand-in of the adapter on which the class's own check_size / check_frames / latent_frames run
    # from the VAE's and the denoiser's config.json alone; None where those could not be read
    checks: GeneratorAdapter | None

    @property
    def family(self) -> str:
        return self.adapter_class.family

    @property
    def is_video(self) -> bool:
        return self.adapter_class.is_video

    @property
    def default_num_frames(self) -> int | None:
        if not self.is_video:
            return None
        return int(self.defaults.get("num_frames", self.adapter_class.default_num_frames))


def _json_file(path: str | None) -> dict[str, Any] | None:
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        value = json.load(f)
    return value if isinstance(value, dict) else None


def _config_stand_in(cls: type[GeneratorAdapter], vae: dict | None, denoiser: dict | None) -> Any:
    """An instance of ``cls`` that holds only the two configs (no __init__, no weights): enough for the
    config-reading checks of the adapter, and the same code as the loaded adapter runs."""
    if vae is None or denoiser is None:
        return None
    from types import SimpleNamespace

    from diffusers.configuration_utils import FrozenDict

    stand_in = object.__new__(cls)
    stand_in.vae = SimpleNamespace(config=FrozenDict(vae))
    stand_in.denoiser_config = FrozenDict(denoiser)
    stand_in.vae_scale_factor = stand_in._vae_spatial_factor()
    return stand_in


def preview_model(path_or_id: str) -> ModelPreview | None:
    """:class:`ModelPreview` of a built-in, a shipped model, a local pipeline folder, or a hub id whose files
    are in the local Hugging Face cache, read without loading weights and without the network; None when
    the family cannot be told that way (loading the model then checks everything, or says why it cannot)."""
    try:
        if path_or_id.startswith(BUILTIN_PREFIX) and not os.path.exists(path_or_id):
            from pipelines import tiny

            family = path_or_id[len(BUILTIN_PREFIX) :]
            if family not in tiny.FAMILIES:
                return None  # load_pipeline names the built-ins
            cls = adapter_class(tiny.pipeline_class(family).__name__)
            pipe = tiny.build(family)  # tiny: built in well under a second
            denoiser = getattr(pipe, cls.denoiser_name)
            checks = _config_stand_in(cls, dict(pipe.vae.config), dict(denoiser.config))
            return ModelPreview(cls, {}, checks)
        if path_or_id in SHIPPED or os.path.isdir(path_or_id):
            folder = shipped_model_path(path_or_id) if path_or_id in SHIPPED else path_or_id
            cls = adapter_class(str(read_model_index(folder).get("_class_name")))

            def config(name: str) -> dict | None:
                return _json_file(os.path.join(folder, name, "config.json"))

            defaults = model_defaults(path_or_id)
        else:
            from huggingface_hub import try_to_load_from_cache

            def cached(file: str) -> str | None:
                found = try_to_load_from_cache(path_or_id, file)
                return found if isinstance(found, str) else None

            index = _json_file(cached("model_index.json"))
            if index is None:
                return None
            cls = adapter_class(str(index.get("_class_name")))

            def config(name: str) -> dict | None:
                return _json_file(cached(f"{name}/config.json"))

            defaults = {}
        checks = _config_stand_in(cls, config("vae"), config(cls.denoiser_name))
        if checks is not None:
            checks.stored_default_size = stored_size(defaults)
        return ModelPreview(cls, defaults, checks)
    except Exception:  # noqa: BLE001 - not knowable before loading: load_pipeline checks, or says why not
        return None


def text_component_names(cls: type[GeneratorAdapter]) -> list[str]:
    """The text encoders of an adapter class and their tokenizers, as pipeline component names."""
    names = []
    for encoder in cls.text_components:
        names += [encoder, encoder.replace("text_encoder", "tokenizer")]
    return names


def load_components(
    path_or_id: str,
    names: list[str] | tuple[str, ...],
    *,
    dtype: str | torch.dtype = "float32",
    revision: str | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """Only the named components of a model (e.g. the text encoders and tokenizers a model was loaded
    without), on the CPU: every other component is skipped by ``from_pretrained``."""
    names = list(names)
    if path_or_id.startswith(BUILTIN_PREFIX) and not os.path.exists(path_or_id):
        from pipelines import tiny

        components = tiny.build(path_or_id[len(BUILTIN_PREFIX) :]).components
        return {name: components.get(name) for name in names}
    if path_or_id in SHIPPED:
        path_or_id = shipped_model_path(path_or_id)
    index = read_model_index(path_or_id)
    cls = adapter_class(str(index.get("_class_name")))
    skipped = {key: None for key in index if not key.startswith("_") and key not in names}
    options = {key: value for key, value in (("revision", revision), ("variant", variant)) if value}
    try:
        pipe = cls.pipeline_class.from_pretrained(
            path_or_id, dtype=resolve_dtype(dtype), **skipped, **options
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"could not load {', '.join(names)} of {path_or_id!r}: {error}") from error
    return {name: getattr(pipe, name, None) for name in names}


def adapter_class(class_name: str) -> type[GeneratorAdapter]:
    if class_name not in ADAPTERS:
        raise PipelineInputError(
            f"unsupported pipeline class {class_name!r}; vialign supports {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[class_name]


def load_pipeline(
    path_or_id: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    attention: str = "auto",
    lora: str | None = None,
    use_t5: bool = True,
    max_sequence_length: int | None = None,
    clip_skip: int | None = None,
    revision: str | None = None,
    variant: str | None = None,
    text_encoders: bool = True,
) -> GeneratorAdapter:
    """Load a generator adapter.

    Args:
        path_or_id: a local diffusers pipeline folder, a Hugging Face hub id, or a built-in tiny model
            (``tiny-sd``, ``tiny-sd-v``, ``tiny-sd-euler``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``,
            ``tiny-wan``, ``tiny-cogvideox``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: compute dtype of the denoiser and text encoders (``float32``, ``bfloat16``, ``float16``).
        attention: ``auto`` (xformers on CUDA when installed, else torch SDPA), ``sdpa`` or ``xformers``.
        lora: a folder (or file) of diffusers-format LoRA weights to load onto the denoiser.
        use_t5: SD3 only; ``False`` loads the pipeline without its T5 encoder (zeros in its place).
        max_sequence_length: T5 tokens for SD3 (default 256), FLUX and Wan (default 512), CogVideoX (226).
        clip_skip: use an earlier CLIP layer (SD, SDXL, SD3), as the stock pipelines' ``clip_skip``.
        revision, variant: passed to ``from_pretrained`` (e.g. ``variant="fp16"``).
        text_encoders: ``False`` loads neither the text encoders nor the tokenizers (they are never read
            from disk), for a model whose prompts all come from precomputed embeddings
            (``adapter.load_prompt_embeds``); ``encode_prompt`` of any other prompt is then an error.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    model_id = path_or_id
    if path_or_id in SHIPPED:
        path_or_id = shipped_model_path(path_or_id)
    defaults = model_defaults(path_or_id) if os.path.isdir(path_or_id) else {}
    if max_sequence_length is None:
        max_sequence_length = defaults.get("max_sequence_length")
    options = dict(
        device=device,
        dtype=torch_dtype,
        attention=attention,
        max_sequence_length=max_sequence_length,
        clip_skip=clip_skip,
    )
    if path_or_id.startswith(BUILTIN_PREFIX) and not os.path.exists(path_or_id):
        from pipelines import tiny

        family = path_or_id[len(BUILTIN_PREFIX) :]
        if family not in tiny.FAMILIES:
            raise ModelNotFoundError(
                f"unknown built-in model {path_or_id!r}; built-in models: {', '.join(builtin_models())}"
            )
        pipe = tiny.build(family)
        cls = adapter_class(type(pipe).__name__)
        present = {name for name, component in pipe.components.items() if component is not None}
        omitted = [n for n in text_component_names(cls) if n in present] if not text_encoders else []
        pipe.register_modules(**dict.fromkeys(omitted))
    else:
        index = read_model_index(path_or_id)
        cls = adapter_class(str(index.get("_class_name")))
        load_kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if revision is not None:
            load_kwargs["revision"] = revision
        if variant is not None:
            load_kwargs["variant"] = variant
        if cls is StableDiffusionAdapter:
            load_kwargs.update(safety_checker=None, requires_safety_checker=False)
        saved_without_t5 = index.get("text_encoder_3") in (None, [None, None])  # e.g. the ShapeWorld testbed
        if cls is StableDiffusion3Adapter and (not use_t5 or saved_without_t5):
            load_kwargs.update(text_encoder_3=None, tokenizer_3=None)
        omitted = []
        if not text_encoders:
            saved = [n for n in text_component_names(cls) if index.get(n) not in (None, [None, None])]
            omitted = [n for n in saved if n not in load_kwargs]  # what would have been loaded
            load_kwargs.update(dict.fromkeys(saved))
        try:
            pipe = cls.pipeline_class.from_pretrained(path_or_id, **load_kwargs)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(
                f"could not load the {index.get('_class_name')} at {path_or_id!r}: {error}"
            ) from error
    adapter = cls.from_pipeline(pipe, model_id=model_id, **options)
    if omitted:
        # what an export (save_pipeline) reads again, and what the embeddings were computed with
        adapter.omitted_components = tuple(omitted)
        adapter.source_options = {"revision": revision, "variant": variant}
        if cls is StableDiffusion3Adapter:
            adapter.uses_t5 = "text_encoder_3" in omitted
    if "guidance_scale" in defaults:
        adapter.default_guidance_scale = float(defaults["guidance_scale"])
    adapter.default_num_steps = int(defaults.get("num_steps", adapter.default_num_steps))
    if adapter.is_video and "num_frames" in defaults:
        adapter.default_num_frames = int(defaults["num_frames"])
    adapter.stored_default_size = stored_size(defaults)
    if lora is not None:
        adapter.load_lora(lora)
    return adapter
