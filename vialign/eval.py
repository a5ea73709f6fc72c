"""``vialign eval``: sample ShapeWorld prompts and report the oracle's verdict, rewards and diversity.

    vialign eval                                   # the shipped testbed model, shapeworld:eval, 8 seeds each
    vialign eval --lora runs/x/lora --reward shapeworld-clip --out eval/x

Samples are drawn at evaluation seeds (``vialign.algorithms.base.evaluation_seed``), which training
never draws, the same ones ``vialign train`` evaluates at. Writes ``DIR/eval.json`` (oracle accuracy
overall, per attribute and per prompt, with standard errors over seeds, the mean of every
reward asked for; ``clip_diversity``: mean pairwise cosine distance of the tiny CLIP's image embeddings
within a prompt; ``pixel_diversity``: mean pairwise RMS pixel distance within a prompt, the measure
``vialign train`` logs as ``eval/pixel_diversity``) and ``DIR/grid.png`` (rows: prompts, columns: seeds).
Image models only: a video model is refused (before it loads, when its family is known from its name or
``model_index.json``) with the way to evaluate it instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rewards import shapeworld as sw
from vialign.algorithms.base import evaluation_seed
from vialign.config import EvalConfig
from vialign.errors import VialignInputError
from vialign.sample import load_model, read_prompts
from vialign.sampling import Sampler, sde_sampler

GRID_ROWS, GRID_COLUMNS = 12, 8


def eval_prompts(spec: str) -> list[str]:
    """A built-in prompt set (``shapeworld:eval`` or just ``eval``, see ``rewards.shapeworld.PROMPT_SETS``)
    or a file of ShapeWorld prompts."""
    name = spec.removeprefix("shapeworld:")
    if name in sw.PROMPT_SETS:
        prompts = sw.PROMPT_SETS[name]()
    elif spec.startswith("shapeworld:"):
        choices = ", ".join(f"shapeworld:{n}" for n in sw.PROMPT_SETS)
        raise VialignInputError(f"unknown built-in prompt set {spec!r}; choose {choices}")
    else:
        prompts = read_prompts(spec)
    for prompt in prompts:
        sw.parse_prompt(prompt)  # the oracle judges ShapeWorld prompts only
    return prompts


def video_refusal(path: str, family: str) -> str:
    return (
        f"vialign eval judges ShapeWorld images with the image oracle, and {path} is a {family} video model: "
        "evaluate videos in vialign train (data.eval: shapeworld-video:eval, eval.rewards: "
        "[shapeworld-video-oracle]; its grids show each video's first, middle and last frames), or sample "
        "them with vialign sample and score the MP4s with vialign score"
    )


def run_eval(config: EvalConfig) -> dict:
    import rewards
    from vialign.testbed import evaluate
    from vialign.testbed.build import save_grid

    out = Path(config.out)
    if (out / "eval.json").exists() and not config.overwrite:
        raise VialignInputError(
            f"{out / 'eval.json'} already exists; choose another --out or pass --overwrite"
        )
    prompts = eval_prompts(config.prompts)
    extra = {name: rewards.load_reward(name) for name in config.rewards}
    model = config.model
    from pipelines.loading import preview_model

    preview = preview_model(model.path)
    if preview is not None and preview.is_video:  # known before loading: refused without loading it
        raise VialignInputError(video_refusal(model.path, preview.family))
    adapter = load_model(model)
    if adapter.is_video:
        raise VialignInputError(video_refusal(model.path, adapter.family))
    settings = config.sampler
    sampler = Sampler()
    if settings.kind == "sde":
        sampler = sde_sampler(adapter.kind, settings.sde_kind, settings.noise_level, settings.sde_window)
    num_steps = settings.num_steps or adapter.default_num_steps
    guidance_scale = (
        settings.guidance_scale if settings.guidance_scale is not None else adapter.default_guidance_scale
    )
    start = time.time()
    seeds = [evaluation_seed(config.seed + i) for i in range(config.samples_per_prompt)]
    samples = evaluate.generate(
        adapter,
        prompts,
        seeds,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        sampler=sampler,
        batch_size=config.batch_size,
    )
    report = evaluate.oracle_report(samples)
    encoder = rewards.load_reward("shapeworld-clip").encoder
    with torch.no_grad():
        embeddings = encoder.embed_images(samples.pixels)
        reward_means = {
            name: float(reward(samples.pixels, samples.prompts).score.mean())
            for name, reward in extra.items()
        }
    per_prompt = report.correct.float().view(len(prompts), -1).mean(1)
    per_sample = config.samples_per_prompt
    result = {
        "model": model.path,
        "lora": model.lora,
        "prompts": config.prompts,
        "num_prompts": len(prompts),
        "samples_per_prompt": config.samples_per_prompt,
        "num_samples": len(samples.prompts),
        "oracle_accuracy": report.accuracy,
        "oracle_accuracy_se": evaluate.mean_and_se(report.correct.float(), per_sample)[1],
        "per_attribute": report.per_attribute,
        "per_attribute_se": {
            name: evaluate.mean_and_se(verdicts.float(), per_sample)[1]
            for name, verdicts in report.verdicts.items()
        },
        "rewards": reward_means,
        "clip_diversity": evaluate.embedding_diversity(embeddings, config.samples_per_prompt)
        if config.samples_per_prompt > 1
        else None,
        "pixel_diversity": evaluate.pixel_diversity(samples.pixels, config.samples_per_prompt)
        if config.samples_per_prompt > 1
        else None,
        "per_prompt": dict(zip(prompts, per_prompt.tolist())),
        "settings": {
            "sampler": settings.kind,
            "sde_kind": sampler.sde,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "first_evaluation_sample": config.seed,
        },
        "seconds": round(time.time() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    rows, columns = min(GRID_ROWS, len(prompts)), min(GRID_COLUMNS, config.samples_per_prompt)
    pick = [p * config.samples_per_prompt + s for p in range(rows) for s in range(columns)]
    save_grid(
        evaluate.Samples(samples.pixels[pick], [samples.prompts[i] for i in pick], [0] * len(pick)),
        out / "grid.png",
        columns=columns,
    )
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "eval.json")
    return result
