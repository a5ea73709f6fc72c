"""``load_pipeline``: a diffusers checkpoint (hub id or local folder) or a built-in name -> adapter.

The adapter is chosen from ``_class_name`` in the checkpoint's ``model_index.json``; the components are
loaded by that stock pipeline class's own ``from_pretrained`` (so hub ids, local folders, variants and
subfolders behave exactly as in diffusers), then handed to the adapter.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from pipelines.adapter import GeneratorAdapter, resolve_device, resolve_dtype
from pipelines.errors import ModelNotFoundError, PipelineInputError
from pipelines.flux import FluxAdapter
from pipelines.stable_diffusion import StableDiffusionAdapter
from pipelines.stable_diffusion_3 import StableDiffusion3Adapter
from pipelines.stable_diffusion_xl import StableDiffusionXLAdapter

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, type[GeneratorAdapter]] = {
    "StableDiffusionPipeline": StableDiffusionAdapter,
    "StableDiffusionXLPipeline": StableDiffusionXLAdapter,
    "StableDiffusion3Pipeline": StableDiffusion3Adapter,
    "FluxPipeline": FluxAdapter,
}
BUILTIN_PREFIX = "tiny-"
# Shipped pretrained testbed models (assets/shapeworld, installed as the package vialign_assets).
SHIPPED = {"shapeworld": ("shapeworld", "flow"), "shapeworld-unet": ("shapeworld", "unet")}
DEFAULTS_FILE = "vialign.json"  # sampling defaults a model folder may carry (guidance_scale, num_steps, ...)


def supported_pipelines() -> list[str]:
    """The diffusers pipeline classes ``load_pipeline`` accepts."""
    return list(ADAPTERS)


def builtin_models() -> list[str]:
    """Names that load without a download: the shipped testbed models and tiny random pipelines."""
    from pipelines.tiny import FAMILIES

    return [*SHIPPED, *(BUILTIN_PREFIX + family for family in FAMILIES)]


def shipped_model_path(name: str) -> str:
    """Folder of a shipped model (``shapeworld``, ``shapeworld-unet``)."""
    import vialign_assets

    folder = vialign_assets.path(*SHIPPED[name])
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the shipped model {name!r} is missing from {folder}; reinstall vialign, or rebuild it with "
            "python -m vialign.testbed.build"
        )
    return str(folder)


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
            (``tiny-sd``, ``tiny-sd-v``, ``tiny-sd-euler``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: compute dtype of the denoiser and text encoders (``float32``, ``bfloat16``, ``float16``).
        attention: ``auto`` (xformers on CUDA when installed, else torch SDPA), ``sdpa`` or ``xformers``.
        lora: a folder (or file) of diffusers-format LoRA weights to load onto the denoiser.
        use_t5: SD3 only; ``False`` loads the pipeline without its T5 encoder (zeros in its place).
        max_sequence_length: T5 tokens for SD3 (default 256) and FLUX (default 512).
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
    if lora is not None:
        adapter.load_lora(lora)
    return adapter
