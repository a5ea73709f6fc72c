"""The ShapeWorld world and its oracle: deterministic renders, the prompt split, and the oracle's
accuracy on clean and perturbed renders (fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards
from rewards import shapeworld as sw

CLEAN_MIN, PERTURBED_MIN = 0.98, 0.95


def perturb(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of: Gaussian blur (sigma 0.5-1.0 px), pixel noise (sigma 0.06), a small affine warp (rotation
    +-8 deg, scale +-5%, shear +-0.08, shift +-5%)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    kind = rng.integers(3)
    if kind == 0:
        sigma = rng.uniform(0.5, 1.0)
        taps = torch.exp(-(torch.arange(-2, 3, dtype=torch.float32) ** 2) / (2 * sigma**2))
        kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).expand(3, 1, 5, 5)
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    elif kind == 1:
        x = (x + torch.from_numpy(rng.normal(0, 0.06, x.shape).astype(np.float32))).clamp(0, 1)
    else:
        angle, scale, shear = (
            np.deg2rad(rng.uniform(-8, 8)),
            rng.uniform(0.95, 1.05),
            rng.uniform(-0.08, 0.08),
        )
        theta = torch.tensor(
            [
                [scale * np.cos(angle), -np.sin(angle) + shear, rng.uniform(-0.05, 0.05)],
                [np.sin(angle), scale * np.cos(angle), rng.uniform(-0.05, 0.05)],
            ],
            dtype=torch.float32,
        )
        grid = F.affine_grid(theta[None], x.shape, align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return x[0].permute(1, 2, 0).numpy()


def accuracy(perturbed: bool, repeats: int = 3) -> tuple[float, dict[str, float]]:
    rng = np.random.default_rng(0)
    verdicts = []
    for repeat in range(repeats):
        for index, scene in enumerate(sw.all_scenes()):
            image = sw.render(scene, seed=10_000 * repeat + index)
            verdicts.append(sw.judge(perturb(image, rng) if perturbed else image, scene.prompt))
    per_attribute = {a: float(np.mean([v[a] for v in verdicts])) for a in sw.ATTRIBUTES}
    return float(np.mean([all(v.values()) for v in verdicts])), per_attribute


def test_oracle_on_clean_renders():
    overall, per_attribute = accuracy(perturbed=False)
    assert overall >= CLEAN_MIN, per_attribute


def test_oracle_on_perturbed_renders():
    overall, per_attribute = accuracy(perturbed=True)
    assert overall >= PERTURBED_MIN, per_attribute


def test_oracle_rejects_wrong_prompts():
    """An image judged against a prompt that differs in one attribute fails exactly that attribute."""
    scene = sw.Scene("blue", "triangle", "large", "right")
    image = sw.render(scene, seed=7)
    assert all(sw.judge(image, scene.prompt).values())
    for attribute, other in (("colour", "red"), ("shape", "square"), ("size", "small"), ("position", "left")):
        wrong = sw.Scene(**{**scene.__dict__, attribute: other})
        verdict = sw.judge(image, wrong.prompt)
        assert not verdict[attribute] and all(v for a, v in verdict.items() if a != attribute)


def test_blank_images_satisfy_nothing():
    blank = np.full((32, 32, 3), 0.2, np.float32)
    assert not any(sw.judge(blank, "a small red circle on the left").values())


def test_world_is_deterministic_and_split():
    scene = sw.Scene("red", "circle", "small", "left")
    assert np.array_equal(sw.render(scene, 3), sw.render(scene, 3))
    assert not np.array_equal(sw.render(scene, 3), sw.render(scene, 4))
    train, held_out = sw.train_prompts(), sw.held_out_prompts()
    assert len(train) + len(held_out) == 6 * 4 * 2 * 3 and len(held_out) == 36
    assert not set(train) & set(held_out)
    for prompt in held_out:  # each held-out colour-shape pair appears in no training prompt
        scene = sw.parse_prompt(prompt)
        assert not any(f"{scene.colour} {scene.shape}" in p for p in train)
    with pytest.raises(rewards.RewardInputError, match="not a ShapeWorld prompt"):
        sw.parse_prompt("a photo of a cat")


def test_oracle_reward():
    oracle = rewards.load_reward("shapeworld-oracle")
    assert oracle.info.judge and not oracle.info.differentiable
    scenes = [sw.Scene("green", "square", "small", "center"), sw.Scene("orange", "cross", "large", "left")]
    pixels = sw.render_batch(scenes, [1, 2])
    out = oracle(pixels, [scenes[0].prompt, scenes[0].prompt])
    assert out.score.tolist() == [1.0, 0.0]
    assert out.dims["colour"].tolist() == [1.0, 0.0] and out.dims["shape"].tolist() == [1.0, 0.0]
