"""Generator adapters: one per diffusers model family, each exposing prompt encoding, the denoiser
prediction, the noise schedule, initial noise, VAE decode/encode and LoRA, with no sampling loop.

``pipelines`` never imports ``vialign``: it is usable on its own.

    >>> import pipelines
    >>> adapter = pipelines.load_pipeline("tiny-sd3")          # or a hub id / local diffusers folder
    >>> cond = adapter.encode_prompt(["a red square"])
    >>> schedule = adapter.schedule(num_steps=10, height=64, width=64)
"""

from pipelines.adapter import GeneratorAdapter, Guidance, VideoGeneratorAdapter
from pipelines.cogvideox import CogVideoXAdapter
from pipelines.embeds import PromptCache, PromptEmbeds
from pipelines.errors import ModelNotFoundError, PipelineInputError
from pipelines.flux import FluxAdapter
from pipelines.loading import ADAPTERS, builtin_models, load_pipeline, supported_pipelines
from pipelines.prediction import Prediction, convert_prediction
from pipelines.schedules import Schedule
from pipelines.stable_diffusion import StableDiffusionAdapter
from pipelines.stable_diffusion_3 import StableDiffusion3Adapter
from pipelines.stable_diffusion_xl import StableDiffusionXLAdapter
from pipelines.wan import WanAdapter

__all__ = [
    "ADAPTERS",
    "CogVideoXAdapter",
    "FluxAdapter",
    "GeneratorAdapter",
    "Guidance",
    "ModelNotFoundError",
    "PipelineInputError",
    "Prediction",
    "PromptCache",
    "PromptEmbeds",
    "Schedule",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "VideoGeneratorAdapter",
    "WanAdapter",
    "builtin_models",
    "convert_prediction",
    "load_pipeline",
    "supported_pipelines",
]
