"""``vialign sample``: generate images with a rollout, write PNGs and a ``samples.jsonl`` index.

Image ``i`` is drawn from ``torch.Generator("cpu").manual_seed(seed + i)`` (its initial noise and, with
an SDE, its step noise), so it does not depend on the batch size, and with ``--sampler ode`` it is the
image the stock diffusers pipeline gives for the same prompt, steps, guidance, size and generator.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines.adapter import GeneratorAdapter, Guidance
from vialign.config import ModelConfig, SampleConfig
from vialign.data import read_prompt_file
from vialign.errors import VialignInputError
from vialign.sampling import Sampler, rollout_prompts, sde_sampler

INDEX_FILE = "samples.jsonl"
logger = logging.getLogger(__name__)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSONL file with ``prompt``."""
    path = Path(path)
    if not path.is_file():
        raise VialignInputError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in read_prompt_file(path) if line.strip()]
    if not prompts:
        raise VialignInputError(f"prompts file {path} holds no prompts")
    return prompts


def load_model(model: ModelConfig, *, device: str | None = None, with_lora: bool = True) -> GeneratorAdapter:
    """The adapter a ``model:`` config section names (``device`` overrides ``model.device``; the trainer
    loads ``model.lora`` itself, as trainable weights, with ``with_lora=False``)."""
    from pipelines import load_pipeline

    return load_pipeline(
        model.path,
        device=device or model.device,
        dtype=model.dtype,
        attention=model.attention,
        lora=model.lora if with_lora else None,
        use_t5=model.use_t5,
        max_sequence_length=model.max_sequence_length,
        clip_skip=model.clip_skip,
    )


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """B x 3 x H x W in [0, 1] -> B x H x W x 3 uint8, rounded as diffusers' ``numpy_to_pil``."""
    return (pixels.detach().permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_images(
    adapter: GeneratorAdapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int,
    height: int,
    width: int,
    guidance: Guidance,
    sampler: Sampler = Sampler(),
    negative_prompt: str | None = None,
    batch_size: int = 4,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(indices, pixels)`` batch by batch; ``pixels`` are B x 3 x H x W floats in [0, 1]."""
    if len(prompts) != len(seeds):
        raise VialignInputError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    schedule = adapter.schedule(num_steps, height, width)
    sampler.check(schedule)
    for start in range(0, len(prompts), batch_size):
        indices = list(range(start, min(start + batch_size, len(prompts))))
        with torch.no_grad():
            trajectory = rollout_prompts(
                adapter,
                [prompts[i] for i in indices],
                [seeds[i] for i in indices],
                schedule,
                height=height,
                width=width,
                guidance=guidance,
                negative_prompt=negative_prompt,
                sampler=sampler,
            )
            yield indices, adapter.decode(trajectory.final)


@dataclass
class SampleReport:
    out: Path
    files: list[Path]
    height: int
    width: int


def run_sample(config: SampleConfig, *, progress: bool = True) -> SampleReport:
    """The ``vialign sample`` job: validate everything, load the model, sample, write files."""
    prompts = list(config.prompts) + (read_prompts(config.prompts_file) if config.prompts_file else [])
    if not prompts:
        raise VialignInputError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    out = Path(config.out)
    index_path = out / INDEX_FILE
    if out.exists() and not out.is_dir():
        raise VialignInputError(f"--out {out} exists and is not a folder")
    if index_path.exists() and not config.overwrite:
        raise VialignInputError(
            f"{index_path} already exists (an earlier run); choose another --out or pass --overwrite to replace it"
        )
    sampler_config = config.sampler
    model = config.model
    adapter = load_model(model)
    default_height, default_width = adapter.default_size
    height, width = config.height or default_height, config.width or default_width
    adapter.check_size(height, width)
    sampler = Sampler()
    if sampler_config.kind == "sde":
        sampler = sde_sampler(
            adapter.kind, sampler_config.sde_kind, sampler_config.noise_level, sampler_config.sde_window
        )
    num_steps = sampler_config.num_steps or adapter.default_num_steps
    sampler.check(adapter.schedule(num_steps, height, width))
    guidance = adapter.make_guidance(sampler_config.guidance_scale, sampler_config.true_cfg_scale)
    if sampler_config.negative_prompt is not None and not guidance.uses_uncond:
        logger.warning("the negative prompt has no effect: classifier-free guidance is off (scale <= 1)")
    seeds = [config.seed + i for i in range(len(prompts))]
    settings = {
        "model": model.path,
        "lora": model.lora,
        "family": adapter.family,
        "sampler": sampler_config.kind,
        "sde_kind": sampler.sde,
        "noise_level": sampler.level if sampler.sde else None,
        "sde_window": list(sampler.sde_window) if sampler.sde_window else None,
        "num_steps": num_steps,
        "guidance_scale": guidance.embedded if guidance.embedded is not None else guidance.cfg_scale,
        "true_cfg_scale": sampler_config.true_cfg_scale if adapter.family == "flux" else None,
        "negative_prompt": sampler_config.negative_prompt,
        "height": height,
        "width": width,
        "dtype": model.dtype,
    }
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    with (
        open(index_path, "w", encoding="utf-8") as index,
        tqdm(total=len(prompts), unit="img", desc="vialign sample", disable=not progress) as bar,
    ):
        for indices, pixels in generate_images(
            adapter,
            prompts,
            seeds,
            num_steps=num_steps,
            height=height,
            width=width,
            guidance=guidance,
            sampler=sampler,
            negative_prompt=sampler_config.negative_prompt,
            batch_size=config.batch_size,
        ):
            for i, image in zip(indices, to_uint8(pixels)):
                path = out / f"{i:05d}.png"
                save_png(image, path)  # the PNG first: the index never names a missing file
                index.write(
                    json.dumps(
                        {"file": path.name, "prompt": prompts[i], "seed": seeds[i], "index": i, **settings}
                    )
                    + "\n"
                )
                files.append(path)
            index.flush()
            bar.update(len(indices))
    return SampleReport(out=out, files=files, height=height, width=width)
