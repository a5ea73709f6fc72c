"""Train the ShapeWorld testbed from scratch and write it to ``assets/shapeworld`` (not part of CI).

    python -m vialign.testbed.build                 # everything, ~45 minutes on 2 CPU cores
    python -m vialign.testbed.build --quick --out /tmp/sw   # a few steps of each stage (smoke test)

Stages, in order (each logs its progress and timing):
1. VAE (x4, 4 latent channels) on renders of all 144 prompts.
2. Tiny CLIP, contrastive on clean renders of all prompts; its text tower becomes both generators'
   text encoder (as SD's CLIP text encoders come from a CLIP).
3. Flow generator (SD3 pipeline: MMDiT, rectified flow, logit-normal sigma, 10% prompt dropout, EMA) on
   the 108 training prompts only; the EMA checkpoint whose held-out oracle accuracy leaves room for
   alignment (30-65%) and whose training-prompt accuracy is highest is shipped.
4. UNet generator (SD pipeline: epsilon prediction, DDIM schedule), same data and selection.
5. The reward model: the CLIP fine-tuned on the flow generator's own samples labelled by the oracle
   (the stand-in for human raters), plus the preference pairs exported from those samples.
6. The report: metrics.json (every figure), a sample grid, prompt lists.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards import shapeworld as sw
from vialign import media
from vialign.testbed import components, evaluate, train

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "shapeworld"
HEADROOM = (0.30, 0.65)  # held-out oracle accuracy of the shipped generators: room for +10 points
# the shipped preference pairs: flow-generator samples of every prompt at these seeds, up to this many
# (correct, incorrect) pairs per prompt (offline DPO overfits 140 pairs within a minute of training)
PREFERENCE_SEEDS = range(64)
PAIRS_PER_PROMPT = 8


@dataclass
class Steps:
    vae: int = 1500
    clip: int = 1500
    flow: int = 2400
    unet: int = 2400
    reward: int = 600
    eval_every: int = 300
    reward_seeds: int = 16  # generated samples per prompt for the reward model
    eval_seeds: int = 4
    preference_seeds: int = len(PREFERENCE_SEEDS)  # samples per prompt the preference pairs come from
    report_seeds: int = 8  # samples per held-out prompt in the README's figures (best-of-N: N)


QUICK = Steps(
    vae=8,
    clip=8,
    flow=10,
    unet=10,
    reward=5,
    eval_every=10,
    reward_seeds=1,
    eval_seeds=1,
    preference_seeds=2,
    report_seeds=2,
)


def make_adapter(pipe, family_cls):
    adapter = family_cls.from_pipeline(
        pipe, model_id="shapeworld-training", device="cpu", max_sequence_length=components.T5_TOKENS
    )
    return adapter


def train_generator(kind: str, vae_model, clip_model, tok, stats, steps: Steps, log) -> tuple:
    from pipelines.stable_diffusion import StableDiffusionAdapter
    from pipelines.stable_diffusion_3 import StableDiffusion3Adapter

    torch.manual_seed(1)
    if kind == "flow":
        pipe = components.flow_pipeline(vae_model, clip_model, components.flow_transformer(), tok, *stats)
        adapter = make_adapter(pipe, StableDiffusion3Adapter)
    else:
        pipe = components.unet_pipeline(vae_model, clip_model, components.unet(), tok, stats[1])
        adapter = make_adapter(pipe, StableDiffusionAdapter)
    train_prompts, held_out = sw.train_prompts()[::3], sw.held_out_prompts()
    seeds = list(range(steps.eval_seeds))

    def measure(step: int) -> dict:
        return evaluate.split_accuracies(adapter, held_out, train_prompts, seeds, sw.IMAGE_SIZE)

    history, snapshots = train.train_denoiser(
        adapter,
        getattr(steps, kind),
        eval_every=steps.eval_every,
        evaluate=measure,
        log=log,
        lr=5e-4 if kind == "flow" else 1e-3,
    )
    chosen = evaluate.pick_snapshot(history, HEADROOM, log, f"{kind} ")
    adapter.denoiser.load_state_dict(snapshots[chosen["step"]])
    return pipe, adapter, history, chosen


def save_grid(samples: evaluate.Samples, path: Path, columns: int) -> None:
    media.save_grid(samples.pixels, path, columns)


def export_preferences(samples: evaluate.Samples, folder: Path, per_prompt: int = 2) -> int:
    """(prompt, chosen, rejected) pairs: a correct and an incorrect sample of the same prompt, as the
    oracle judges the saved 8-bit images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = (samples.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    correct = [
        all(sw.judge(image.astype(np.float32) / 255, prompt).values())
        for image, prompt in zip(images, samples.prompts)
    ]
    by_prompt: dict[str, tuple[list[int], list[int]]] = {}
    for i, prompt in enumerate(samples.prompts):
        good, bad = by_prompt.setdefault(prompt, ([], []))
        (good if correct[i] else bad).append(i)
    rows = []
    for prompt, (good, bad) in by_prompt.items():
        for k in range(min(per_prompt, len(good), len(bad))):
            pair = len(rows)
            names = {}
            for role, index in (("chosen", good[k]), ("rejected", bad[k])):
                names[role] = f"{pair:04d}_{role}.png"
                Image.fromarray(images[index]).save(folder / names[role])
                names[f"{role}_seed"] = samples.seeds[index]
            rows.append({"prompt": prompt, **names})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def write_preferences(adapter, folder: Path, seeds: range = PREFERENCE_SEEDS) -> int:
    """(Re)write the shipped preference pairs from ``adapter`` (the flow generator); returns the count."""
    for old in folder.glob("*.png"):
        old.unlink()
    all_prompts = [s.prompt for s in sw.all_scenes()]
    samples = evaluate.generate(adapter, all_prompts, seeds)
    return export_preferences(samples, folder, per_prompt=PAIRS_PER_PROMPT)


def report(out: Path, log=print, preference_seeds: range = PREFERENCE_SEEDS, seeds: int = 8) -> dict:
    """The README's figures, measured on the saved folders (float16 weights, loaded as users load them):
    held-out oracle accuracy over 36 prompts x ``seeds`` (8) seeds, training-prompt accuracy (seeds / 4
    each), best-of-8 with the learned reward, its AUC on unseen seeds."""
    import rewards
    from pipelines import load_pipeline

    reward = rewards.load_reward("shapeworld-clip", pretrained=str(out / "clip"))
    figures: dict = {}
    for kind in ("flow", "unet"):
        adapter = load_pipeline(str(out / kind), device="cpu")
        held = evaluate.generate(adapter, sw.held_out_prompts(), range(seeds))
        held_report = evaluate.oracle_report(held)
        seen = evaluate.generate(adapter, sw.train_prompts(), range(max(1, seeds // 4)))
        seen_report = evaluate.oracle_report(seen)
        with torch.no_grad():
            scores = reward(held.pixels, held.prompts).score
        figures[f"{kind}_held_out_accuracy"] = held_report.accuracy
        figures[f"{kind}_held_out_per_attribute"] = held_report.per_attribute
        figures[f"{kind}_train_accuracy"] = seen_report.accuracy
        figures[f"{kind}_held_out_best_of_{seeds}"] = evaluate.best_of_n(scores, held_report.correct, seeds)
        figures[f"{kind}_reward_auc_held_out"] = evaluate.auc(scores, held_report.correct)
        log(f"report {kind}: " + ", ".join(f"{k} {v}" for k, v in figures.items() if k.startswith(kind)))
        if kind == "flow":
            figures["preference_pairs"] = write_preferences(adapter, out / "preferences", preference_seeds)
            # README grid: 6 training and 6 held-out prompts (rows) x 8 seeds
            rng = np.random.default_rng(0)
            rows = [
                *rng.choice(sw.train_prompts(), 6, replace=False),
                *rng.choice(sw.held_out_prompts(), 6, replace=False),
            ]
            save_grid(
                evaluate.generate(adapter, [str(p) for p in rows], range(seeds)),
                out / "grid.png",
                columns=seeds,
            )
            (out / "grid.txt").write_text(
                "rows of grid.png (8 seeds each; the last 6 are held-out prompts):\n"
                + "\n".join(str(p) for p in rows)
                + "\n"
            )
    return figures


def main(argv=None) -> None:
    parser = train.build_parser("Train the ShapeWorld testbed from scratch.", DEFAULT_OUT)
    parser.add_argument(
        "--preferences-only",
        action="store_true",
        help="only rewrite the preference pairs from the saved flow generator",
    )
    args = parser.parse_args(argv)
    if args.preferences_only:
        from pipelines import load_pipeline

        metrics_file = args.out / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        count = write_preferences(
            load_pipeline(str(args.out / "flow"), device="cpu"), args.out / "preferences"
        )
        metrics.setdefault("readme", {})["preference_pairs"] = count
        metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {count} preference pairs to {args.out / 'preferences'}")
        return
    if args.report_only:
        metrics_file = args.out / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        metrics["readme"] = report(args.out)
        metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    steps = QUICK if args.quick else Steps()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log = train.BuildLog(out / "build.log")

    metrics: dict = {"steps": steps.__dict__, "timing_seconds": {}}
    tok = components.tokenizer()

    t = time.time()
    vae_model = train.train_vae(steps.vae, log=log)
    stats = train.latent_statistics(vae_model)
    with torch.no_grad():
        pixels, prompts = train.sample_batch(np.random.default_rng(99), sw.all_scenes(), 288)
        recon = (
            vae_model.decode(vae_model.encode(pixels * 2 - 1).latent_dist.mode()).sample / 2 + 0.5
        ).clamp(0, 1)
    recon_report = evaluate.oracle_report(evaluate.Samples(recon, prompts, [0] * len(prompts)))
    metrics["vae"] = {
        "latent_mean": stats[0],
        "latent_std": stats[1],
        "reconstruction_oracle_accuracy": recon_report.accuracy,
        "reconstruction_mse": float(((recon - pixels) ** 2).mean()),
    }
    metrics["timing_seconds"]["vae"] = round(time.time() - t)
    log(f"vae done: {metrics['vae']}")

    t = time.time()
    clip_model = train.train_clip(tok, steps.clip, log=log)
    metrics["clip"] = {"retrieval_accuracy_clean": train.retrieval_accuracy(clip_model, tok)}
    metrics["timing_seconds"]["clip"] = round(time.time() - t)
    log(f"clip done: {metrics['clip']}")

    generators = {}
    for kind in ("flow", "unet"):
        t = time.time()
        pipe, adapter, history, chosen = train_generator(kind, vae_model, clip_model, tok, stats, steps, log)
        generators[kind] = (pipe, adapter)
        metrics[kind] = {"history": history, "shipped_step": chosen["step"]}
        metrics["timing_seconds"][kind] = round(time.time() - t)

    # The reward model learns from the flow generator's samples of every prompt, labelled by the oracle.
    t = time.time()
    flow_adapter = generators["flow"][1]
    all_prompts = [s.prompt for s in sw.all_scenes()]
    train_samples = evaluate.generate(flow_adapter, all_prompts, range(steps.reward_seeds))
    train_labels = evaluate.oracle_report(train_samples).correct
    test_seeds = range(10_000, 10_000 + steps.eval_seeds)
    test_samples = evaluate.generate(flow_adapter, all_prompts, test_seeds)
    test_labels = evaluate.oracle_report(test_samples).correct
    reward_model, head = train.finetune_reward(
        clip_model, tok, train_samples.pixels, train_samples.prompts, train_labels, steps.reward, log=log
    )
    with torch.no_grad():
        image, text = train.clip_embeddings(reward_model, tok, test_samples.pixels, test_samples.prompts)
    test_scores = head["a"] * (image * text).sum(-1) + head["b"]
    metrics["reward"] = {
        "train_samples": len(train_labels),
        "train_positive_fraction": float(train_labels.float().mean()),
        "auc_unseen_seeds": evaluate.auc(test_scores, test_labels),
        "retrieval_accuracy_clean": train.retrieval_accuracy(reward_model, tok),
        **head,
    }
    metrics["timing_seconds"]["reward"] = round(time.time() - t)
    log(f"reward done: {metrics['reward']}")

    components.save_pipeline(generators["flow"][0], out / "flow")
    components.save_pipeline(
        generators["unet"][0],
        out / "unet",
        {k: v for k, v in components.MODEL_DEFAULTS.items() if k in ("guidance_scale", "num_steps")},
    )
    components.save_clip(reward_model, tok, out / "clip", head)
    (out / "prompts").mkdir(exist_ok=True)
    (out / "prompts" / "train.txt").write_text("\n".join(sw.train_prompts()) + "\n")
    (out / "prompts" / "held_out.txt").write_text("\n".join(sw.held_out_prompts()) + "\n")
    metrics["timing_seconds"]["training_total"] = round(time.time() - start)
    metrics["readme"] = report(out, log, range(steps.preference_seeds), steps.report_seeds)
    metrics["timing_seconds"]["total"] = round(time.time() - start)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"done in {metrics['timing_seconds']['total']} s; wrote {out}")
    log.close()


if __name__ == "__main__":
    main()
