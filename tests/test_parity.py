"""ODE parity with stock diffusers: ``vialign sample --sampler ode`` writes the image that the stock
pipeline, loaded from the same folder, gives for the same prompt, steps, guidance, size and
``generator=torch.Generator("cpu").manual_seed(seed + i)`` (max pixel difference <= 1/255)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import tiny
from vialign.cli import main

PROMPTS = ["a red square", "a photo of a blue dog on the grass"]
SEED, STEPS, SIZE = 11, 4, 64


def stock_images(pipe, guidance_scale: float, **kwargs) -> list[np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(PROMPTS):
        out = pipe(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator("cpu").manual_seed(SEED + i),
            **kwargs,
        )
        images.append(np.asarray(out.images[0], dtype=np.int16))
    return images


def vialign_images(folder: str, out, guidance_scale: float, *extra: str) -> list[np.ndarray]:
    argv = [
        "sample",
        "--model",
        folder,
        "--out",
        str(out),
        "--num-steps",
        str(STEPS),
        "--seed",
        str(SEED),
        "--guidance-scale",
        str(guidance_scale),
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        "--sampler",
        "ode",
        "--batch-size",
        "2",
        *extra,
    ]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["seed"] for r in rows] == [SEED, SEED + 1]
    return [np.asarray(Image.open(out / r["file"]), dtype=np.int16) for r in rows]


def assert_parity(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (SIZE, SIZE, 3)
        assert np.abs(a - b).max() <= 1, f"max pixel difference {np.abs(a - b).max()}/255"
    assert np.abs(ours[0] - ours[1]).max() > 10  # the two prompts/seeds give different images


@pytest.mark.parametrize(
    "family,guidance_scale",
    [
        ("sd", 5.0),
        ("sd-v", 5.0),
        ("sd-euler", 5.0),
        ("sdxl", 5.0),
        ("sd3", 4.0),
        ("flux", 3.5),
    ],
    ids=["sd-ddim-eps", "sd-ddim-v", "sd-euler", "sdxl-euler", "sd3-flowmatch", "flux-flowmatch"],
)
def test_ode_sampling_reproduces_stock_diffusers(tiny_dir, tmp_path, quiet_libraries, family, guidance_scale):
    folder = tiny_dir(family)
    ours = vialign_images(folder, tmp_path / "out", guidance_scale)
    theirs = stock_images(tiny.pipeline_class(family).from_pretrained(folder), guidance_scale)
    assert_parity(ours, theirs)


def test_sd3_without_t5_reproduces_stock_diffusers(tiny_dir, tmp_path, quiet_libraries):
    folder = tiny_dir("sd3")
    ours = vialign_images(folder, tmp_path / "out", 4.0, "model.use_t5=false")
    stock = tiny.pipeline_class("sd3").from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert_parity(ours, stock_images(stock, 4.0))


def test_flux_true_cfg_with_negative_prompt_reproduces_stock_diffusers(tiny_dir, tmp_path, quiet_libraries):
    folder = tiny_dir("flux")
    ours = vialign_images(
        folder, tmp_path / "out", 3.5, "--true-cfg-scale", "2.0", "--negative-prompt", "blurry"
    )
    stock = tiny.pipeline_class("flux").from_pretrained(folder)
    assert_parity(ours, stock_images(stock, 3.5, true_cfg_scale=2.0, negative_prompt="blurry"))


def test_unsupported_scheduler_is_replaced_by_ddim_and_said_so(tmp_path, quiet_libraries, caplog):
    """SD 1.5 ships PNDM; vialign samples with DDIM from the same config and warns which it uses."""
    from diffusers import DDIMScheduler, PNDMScheduler

    pipe = tiny.build("sd")
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    folder = tmp_path / "pndm"
    pipe.save_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        ours = vialign_images(str(folder), tmp_path / "out", 5.0)
    assert "PNDMScheduler" in caplog.text and "DDIMScheduler" in caplog.text
    stock = tiny.pipeline_class("sd").from_pretrained(folder)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    assert_parity(ours, stock_images(stock, 5.0))


def test_images_do_not_depend_on_the_batch_size(tiny_dir, tmp_path, quiet_libraries):
    folder = tiny_dir("sd3")
    batched = vialign_images(folder, tmp_path / "a", 4.0)
    single = vialign_images(folder, tmp_path / "b", 4.0, "batch_size=1")
    for a, b in zip(batched, single):
        assert np.abs(a - b).max() <= 1
