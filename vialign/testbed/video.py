"""Train the ShapeWorld video testbed from scratch and write it to ``assets/shapeworld_video`` (not CI).

    python -m vialign.testbed.video                       # everything, see metrics.json for the time
    python -m vialign.testbed.video --quick --out /tmp/swv   # a few steps of each stage (smoke test)

The world is :mod:`rewards.shapeworld_video` (one shape moving left, right or staying still; 9 frames of
32 x 32; 24 pretraining prompts, 12 held-out triples). Stages, in order (each logs progress and timing):

1. VAE: diffusers' ``AutoencoderKLWan`` (Wan2.1's causal 3D VAE) at toy width, x4 in space and x4 in
   time, 16 latent channels (as Wan2.1's): a 9-frame video is 16 x 3 x 8 x 8 latents; trained on renders
   of all 36 prompts, with the oracle's reading of its reconstructions logged as it trains. Its
   per-channel ``latents_mean`` / ``latents_std`` are measured and stored in its config, as Wan2.1's are.
2. Generator: a ``WanPipeline`` (``WanTransformer3DModel``, 4 blocks of width 128 over 1x2x2 patches: 48
   tokens; a frozen, randomly initialised UMT5 encoder over a word-level T5 tokenizer, as Wan freezes its
   UMT5), rectified flow with logit-normal sigma, 10% prompt dropout, EMA, on the 24 pretraining prompts
   only. The EMA checkpoint whose held-out oracle accuracy leaves room for alignment (``HEADROOM``) and
   whose pretraining-prompt accuracy is highest is shipped.
3. Reward: a tiny CLIP whose vision tower sees the 9 frames stacked as 27 channels (so motion is visible
   to its first layer), contrastive on renders, then fine-tuned on the generator's own samples labelled
   by the oracle (a logistic head ``a cos + b``, as ``shapeworld-clip``): ``shapeworld-video-clip``.
4. Report: every figure in ``metrics.json``, a strip of frames per held-out prompt (``strip.png``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rewards import shapeworld_video as swv
from vialign import media
from vialign.testbed import components, evaluate, train

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "shapeworld_video"
HEADROOM = (0.25, 0.65)  # held-out oracle accuracy of the shipped generator: room for +10 points
# 16 as in Wan2.1. With 8, reconstructions rounded the squares' corners and smeared them along the motion
# inside each 4-frame latent: the oracle read 12.5% of reconstructed squares as squares, which capped the
# generator (and any alignment of it) on every square prompt.
LATENT_CHANNELS = 16
TEXT_WIDTH = 64
TEXT_TOKENS = 8  # the longest prompt ("a yellow triangle staying still") is 5 words + </s>
WORDS = ("yellow", "circle", "square", "triangle", "moving", "left", "right", "staying", "still")
MODEL_DEFAULTS = {
    "guidance_scale": 4.0,
    "num_steps": 20,
    "num_frames": swv.NUM_FRAMES,
    "size": [swv.FRAME_SIZE, swv.FRAME_SIZE],
    "max_sequence_length": TEXT_TOKENS,
}


@dataclass
class Steps:
    vae: int = 1800
    generator: int = 4000
    clip: int = 800
    reward: int = 500
    eval_every: int = 500
    pool_seeds: int = 96  # pre-rendered videos per prompt of all 36 (the VAE's data)
    train_pool_seeds: int = 192  # pre-rendered videos per pretraining prompt (the generator's, encoded)
    reward_seeds: int = 24  # generated videos per prompt for the reward model
    eval_seeds: int = 4
    report_seeds: int = 8


QUICK = Steps(
    vae=4,
    generator=6,
    clip=4,
    reward=3,
    eval_every=6,
    pool_seeds=4,
    train_pool_seeds=4,
    reward_seeds=1,
    eval_seeds=1,
    report_seeds=2,
)


# ---------------------------------------------------------------------------------------- components
def tokenizer() -> Any:
    """A T5 (Unigram) tokenizer in which every ShapeWorld video word is one token."""
    from pipelines.tiny import t5_tokenizer

    return t5_tokenizer(model_max_length=TEXT_TOKENS, extra_words=WORDS)


def vae() -> Any:
    """Wan2.1's causal 3D VAE at toy width: 3 x 9 x 32 x 32 <-> 16 x 3 x 8 x 8."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=16,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


def text_encoder(vocab_size: int) -> Any:
    """Frozen and randomly initialised (seeded), as a stand-in for Wan's frozen UMT5."""
    from pipelines.tiny import t5_encoder

    torch.manual_seed(2)
    return t5_encoder(TEXT_WIDTH, vocab_size, umt5=True, d_kv=16, d_ff=128).eval().requires_grad_(False)


def transformer() -> Any:
    """The generator: Wan2.1's transformer, 4 blocks of width 128 (``pipelines.tiny.wan_transformer``)."""
    from pipelines.tiny import wan_transformer

    return wan_transformer(
        heads=4,
        head_dim=32,
        channels=LATENT_CHANNELS,
        text_dim=TEXT_WIDTH,
        freq_dim=64,
        ffn_dim=256,
        layers=4,
    )


def pipeline(vae_model: Any, tok: Any, encoder: Any, denoiser: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=tok,
        text_encoder=encoder,
        vae=vae_model,
        transformer=denoiser,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )


def adapter_of(pipe: Any) -> Any:
    from pipelines.wan import WanAdapter

    adapter = WanAdapter.from_pipeline(
        pipe, model_id="shapeworld-video-training", device="cpu", max_sequence_length=TEXT_TOKENS
    )
    adapter.default_num_frames = swv.NUM_FRAMES
    return adapter


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Pool:
    """Pre-rendered videos (uint8, ``N x F x 3 x H x W``) and their prompts: rendering is the slow part."""

    videos: torch.Tensor
    prompts: list[str]

    @classmethod
    def render(cls, scenes: list[swv.VideoScene], seeds_per_scene: int, offset: int = 0) -> Pool:
        chosen = [s for s in scenes for _ in range(seeds_per_scene)]
        seeds = [offset + i for i in range(len(chosen))]
        videos = swv.render_video_batch(chosen, seeds)
        return cls((videos * 255).round().to(torch.uint8), [s.prompt for s in chosen])

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[str]]:
        index = rng.integers(len(self.prompts), size=size)
        return self.videos[torch.from_numpy(index)].float() / 255, [self.prompts[i] for i in index]


def frames_as_channels(videos: torch.Tensor) -> torch.Tensor:
    """``B x F x 3 x H x W`` -> ``B x 3F x H x W``: what the video CLIP's vision tower takes."""
    return videos.flatten(1, 2)


def train_vae(
    pool: Pool,
    steps: int,
    *,
    batch: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    probe: Pool | None = None,
    log=print,
) -> Any:
    """MSE + a small KL on renders; every 300 steps the oracle reads reconstructions of ``probe``."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = vae().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        videos, _ = pool.batch(rng, batch)
        x = (videos * 2 - 1).transpose(1, 2)  # B x 3 x F x H x W
        posterior = model.encode(x).latent_dist
        loss = F.mse_loss(model.decode(posterior.sample()).sample, x) + kl_weight * posterior.kl().mean()
        train.optimizer_step(optimizer, loss, lr * train.cosine_lr(step, steps), clip=model.parameters())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:5d}  loss {loss.item():.5f}  {time.time() - start:6.0f} s")
        if probe is not None and (step + 1) % 300 == 0:
            log(f"vae step {step:5d}  reconstructions: {reconstruction_report(model.eval(), probe)}")
            model.train()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_report(model: Any, pool: Pool) -> dict:
    """What the oracle reads in the VAE's reconstructions of ``pool``: accuracy, per attribute, per
    shape (the attribute a blurry VAE loses first), and the pixel MSE."""
    videos = pool.videos.float() / 255
    x = (videos * 2 - 1).transpose(1, 2)
    recon = torch.cat([model(part).sample for part in x.split(64)]).transpose(1, 2) / 2 + 0.5
    recon = recon.clamp(0, 1)
    oracle = evaluate.oracle_report(evaluate.Samples(recon, pool.prompts, [0] * len(pool.prompts)))
    shape_right = oracle.verdicts["shape"].float()
    per_shape = {
        shape: round(float(shape_right[[shape in p for p in pool.prompts]].mean()), 4)
        for shape in swv.SHAPES_USED
    }
    return {
        "reconstruction_oracle_accuracy": round(oracle.accuracy, 4),
        "reconstruction_per_attribute": {a: round(v, 4) for a, v in oracle.per_attribute.items()},
        "reconstruction_shape_accuracy": per_shape,
        "reconstruction_mse": round(float(((recon - videos) ** 2).mean()), 6),
    }


@torch.no_grad()
def set_latent_statistics(model: Any, pool: Pool, count: int = 512) -> dict[str, list[float]]:
    """Per-channel mean and std of the posterior means over ``count`` pool videos, into the VAE's config
    (``latents_mean`` / ``latents_std``, as Wan2.1's VAE carries them)."""
    x = (pool.videos[:count].float() / 255 * 2 - 1).transpose(1, 2)
    z = torch.cat([model.encode(part).latent_dist.mean for part in x.split(64)])
    stats = {
        "latents_mean": [round(float(v), 5) for v in z.mean((0, 2, 3, 4))],
        "latents_std": [round(float(v), 5) for v in z.std((0, 2, 3, 4))],
    }
    model.register_to_config(**stats)
    return stats


@torch.no_grad()
def encoded_pool(adapter: Any, pool: Pool) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool video, in the denoiser's latent space."""
    means, stds = [], []
    for start in range(0, len(pool.prompts), 64):
        videos = pool.videos[start : start + 64].float() / 255
        posterior = adapter.vae.encode((videos * 2 - 1).transpose(1, 2)).latent_dist
        means.append(adapter._model_space(posterior.mean))
        _, channel_std, scaling = adapter._latent_stats(posterior.std)  # the map is affine: std scales
        stds.append(posterior.std * scaling / channel_std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------------------- stages
def train_generator(adapter: Any, pool: Pool, steps: Steps, log) -> tuple[list[dict], dict]:
    mean, std = encoded_pool(adapter, pool)
    train_prompts, held_out = swv.train_prompts(), swv.held_out_prompts()
    seeds = list(range(steps.eval_seeds))

    def latents(rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[str]]:
        index = torch.from_numpy(rng.integers(len(pool.prompts), size=batch))
        noise = torch.from_numpy(rng.standard_normal(mean[index].shape).astype(np.float32))
        return mean[index] + std[index] * noise, [pool.prompts[i] for i in index]

    def measure(step: int) -> dict:
        return evaluate.split_accuracies(adapter, held_out, train_prompts, seeds, swv.FRAME_SIZE)

    history, snapshots = train.train_denoiser(
        adapter,
        steps.generator,
        batch=64,
        lr=5e-4,
        eval_every=steps.eval_every,
        evaluate=measure,
        log=log,
        latents=latents,
    )
    chosen = evaluate.pick_snapshot(history, HEADROOM, log)
    adapter.denoiser.load_state_dict(snapshots[chosen["step"]])
    return history, chosen


def video_clip(vocab_size: int) -> Any:
    """The image testbed's tiny CLIP with a vision tower over the 9 frames stacked as 27 channels."""
    model = components.clip(vocab_size)
    from transformers import CLIPConfig, CLIPModel

    config = model.config.to_dict()
    config["vision_config"]["num_channels"] = 3 * swv.NUM_FRAMES
    return CLIPModel(CLIPConfig(**config))


def train_reward(
    generator: Any, tok: Any, steps: Steps, log
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Contrastive pretraining on renders, then the logistic head on oracle-labelled generator samples."""
    scenes = swv.all_scenes()

    def renders(rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[str]]:
        chosen = [scenes[i] for i in rng.integers(len(scenes), size=batch)]
        videos = swv.render_video_batch(chosen, rng.integers(2**31, size=batch).tolist())
        return frames_as_channels(videos), [s.prompt for s in chosen]

    model = train.train_clip(tok, steps.clip, model=video_clip(len(tok)), renders=renders, log=log)
    all_prompts = [s.prompt for s in scenes]
    samples = evaluate.generate(generator, all_prompts, range(steps.reward_seeds), size=swv.FRAME_SIZE)
    labels = evaluate.oracle_report(samples).correct
    test = evaluate.generate(
        generator, all_prompts, range(10_000, 10_000 + steps.eval_seeds), size=swv.FRAME_SIZE
    )
    test_labels = evaluate.oracle_report(test).correct
    model, head = train.finetune_reward(
        model,
        tok,
        frames_as_channels(samples.pixels),
        samples.prompts,
        labels,
        steps.reward,
        renders=renders,
        log=log,
    )
    with torch.no_grad():
        image, text = train.clip_embeddings(model, tok, frames_as_channels(test.pixels), test.prompts)
    scores = head["a"] * (image * text).sum(-1) + head["b"]
    figures = {
        "train_samples": len(labels),
        "train_positive_fraction": float(labels.float().mean()),
        "auc_unseen_seeds": evaluate.auc(scores, test_labels),
    }
    return model, head, figures


def save_strip(adapter: Any, prompts: list[str], path: Path, seed: int = 0) -> None:
    """One row per prompt: the 9 frames of its video at ``seed``."""
    samples = evaluate.generate(adapter, prompts, [seed], size=swv.FRAME_SIZE)
    media.save_grid(samples.pixels.flatten(0, 1), path, swv.NUM_FRAMES)


def report(out: Path, log=print, seeds: int = 8) -> dict:
    """The README's figures, measured on the saved folders (float16 weights, loaded as users load them)."""
    import rewards
    from pipelines import load_pipeline

    reward = rewards.load_reward("shapeworld-video-clip", pretrained=str(out / "clip"))
    adapter = load_pipeline(str(out / "wan"), device="cpu")
    figures: dict = {}
    for name, prompts in (("held_out", swv.held_out_prompts()), ("train", swv.train_prompts())):
        count = seeds if name == "held_out" else max(1, seeds // 4)
        samples = evaluate.generate(adapter, prompts, range(count), size=swv.FRAME_SIZE)
        oracle = evaluate.oracle_report(samples)
        figures[f"{name}_accuracy"] = oracle.accuracy
        figures[f"{name}_per_attribute"] = oracle.per_attribute
        if name == "held_out":
            with torch.no_grad():
                scores = reward(samples.pixels.transpose(1, 2), samples.prompts).score
            figures[f"held_out_best_of_{seeds}"] = evaluate.best_of_n(scores, oracle.correct, seeds)
            figures["reward_auc_held_out"] = evaluate.auc(scores, oracle.correct)
    save_strip(adapter, swv.held_out_prompts(), out / "strip.png")
    (out / "strip.txt").write_text(
        "rows of strip.png (the 9 frames of seed 0):\n" + "\n".join(swv.held_out_prompts()) + "\n"
    )
    log("report: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    return figures


def main(argv=None) -> None:
    parser = train.build_parser("Train the ShapeWorld video testbed from scratch.", DEFAULT_OUT)
    args = parser.parse_args(argv)
    steps = QUICK if args.quick else Steps()
    out: Path = args.out
    if args.report_only:
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["readme"] = report(out, seeds=steps.report_seeds)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log = train.BuildLog(out / "build.log")

    metrics: dict = {"steps": steps.__dict__, "timing_seconds": {}}
    t = time.time()
    pool = Pool.render(swv.all_scenes(), steps.pool_seeds)
    train_pool = Pool.render(
        [s for s in swv.all_scenes() if not s.held_out], steps.train_pool_seeds, 1_000_000
    )
    metrics["timing_seconds"]["render"] = round(time.time() - t)
    log(f"rendered {len(pool.prompts)} + {len(train_pool.prompts)} videos")

    t = time.time()
    probe = Pool.render(swv.all_scenes(), max(1, steps.report_seeds), 5_000_000)  # unseen seeds
    vae_model = train_vae(pool, steps.vae, probe=probe, log=log)
    stats = set_latent_statistics(vae_model, pool)
    metrics["vae"] = {**stats, **reconstruction_report(vae_model, probe)}
    metrics["timing_seconds"]["vae"] = round(time.time() - t)
    log(f"vae done: {metrics['vae']}")

    t = time.time()
    tok = tokenizer()
    pipe = pipeline(vae_model, tok, text_encoder(len(tok)), transformer())
    adapter = adapter_of(pipe)
    torch.manual_seed(1)
    history, chosen = train_generator(adapter, train_pool, steps, log)
    metrics["generator"] = {"history": history, "shipped_step": chosen["step"]}
    metrics["timing_seconds"]["generator"] = round(time.time() - t)

    t = time.time()
    clip_tok = components.tokenizer()
    reward_model, head, figures = train_reward(adapter, clip_tok, steps, log)
    metrics["reward"] = {**figures, **head}
    metrics["timing_seconds"]["reward"] = round(time.time() - t)
    log(f"reward done: {metrics['reward']}")

    components.save_pipeline(pipe, out / "wan", MODEL_DEFAULTS)
    components.save_clip(reward_model, clip_tok, out / "clip", {**head, "frames": swv.NUM_FRAMES})
    metrics["timing_seconds"]["training_total"] = round(time.time() - start)
    metrics["readme"] = report(out, log, steps.report_seeds)
    metrics["timing_seconds"]["total"] = round(time.time() - start)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"done in {metrics['timing_seconds']['total']} s; wrote {out}")
    log.close()


if __name__ == "__main__":
    main()
