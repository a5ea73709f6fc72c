"""LoRA round trip: a LoRA attached and saved by vialign loads with stock ``pipe.load_lora_weights(dir)``
and reproduces vialign's images; ``vialign sample --lora dir`` does too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import tiny
from vialign.cli import main
from vialign.sample import generate_images, to_uint8

PROMPTS = ["a red square", "a blue circle"]
SEED, STEPS, SIZE = 3, 3, 64


def randomise_lora(adapter) -> None:
    """peft starts LoRA B at zero (no effect); give A and B seeded values so the LoRA changes images."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.lora_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_lora_saved_by_vialign_loads_in_stock_diffusers(tiny_dir, tmp_path, quiet_libraries, family):
    folder = tiny_dir(family)
    adapter = pipelines.load_pipeline(folder, device="cpu")
    guidance = adapter.make_guidance(4.0)
    seeds = [SEED + i for i in range(len(PROMPTS))]

    def sample() -> np.ndarray:
        pixels = torch.cat(
            [
                p
                for _, p in generate_images(
                    adapter, PROMPTS, seeds, num_steps=STEPS, height=SIZE, width=SIZE, guidance=guidance
                )
            ]
        )
        return to_uint8(pixels).astype(np.int16)

    base = sample()
    config = adapter.add_lora(rank=4, alpha=8)  # alpha != rank: the scale must survive the round trip
    assert all(p.requires_grad and p.dtype == torch.float32 for p in adapter.lora_parameters())
    randomise_lora(adapter)
    with_lora = sample()
    assert np.abs(with_lora - base).max() > 10, "the LoRA should change the images"
    with adapter.lora_disabled():
        assert np.abs(sample() - base).max() == 0
    lora_dir = tmp_path / "lora"
    weights = adapter.save_lora(lora_dir)
    assert weights.endswith("pytorch_lora_weights.safetensors") and config.r == 4

    stock = tiny.pipeline_class(family).from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(lora_dir))
    for i, prompt in enumerate(PROMPTS):
        image = stock(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(seeds[i]),
        ).images[0]
        assert np.abs(np.asarray(image, dtype=np.int16) - with_lora[i]).max() <= 1

    out = tmp_path / "cli"
    argv = [
        "sample",
        "--model",
        folder,
        "--lora",
        str(lora_dir),
        "--out",
        str(out),
        "--num-steps",
        str(STEPS),
        "--seed",
        str(SEED),
        "--guidance-scale",
        "4.0",
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
    ]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    for i in range(len(PROMPTS)):
        image = np.asarray(Image.open(out / f"{i:05d}.png"), dtype=np.int16)
        assert np.abs(image - with_lora[i]).max() <= 1


def test_save_lora_without_adapter_is_a_clear_error(tmp_path):
    adapter = pipelines.load_pipeline("tiny-sd", device="cpu")
    with pytest.raises(pipelines.PipelineInputError, match="no LoRA adapter"):
        adapter.save_lora(tmp_path)
    with pytest.raises(pipelines.PipelineInputError, match="no LoRA weights"):
        adapter.load_lora(tmp_path)
