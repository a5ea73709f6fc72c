"""Throughput of ``vialign score`` against the per-image loop that the official packages use, on the
same model, in one run.

    python benchmarks/scoring.py [--images 64] [--per-prompt 4] [--size 512] [--batch 16]

The model is a transformers CLIPModel with CLIP ViT-B/32's architecture (random weights, built
locally: no download). The reference loop is what ``hpsv2.score`` and ImageReward's ``score`` do for a
list of files: per image, open it with PIL, run the official processor, tokenise the prompt, one
forward pass at batch 1. Also timed: ``hpsv2.score`` called once per image (as a folder whose images
have different prompts needs), which reloads the checkpoint on every call. ``vialign score`` reads the same PNG files, preprocesses in torch, batches,
embeds each distinct prompt once, and writes scores.jsonl. Scores of the two paths are compared too.
Target: throughput ratio >= 3.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ARCHITECTURES = {
    "vit-b-32": {},  # CLIPConfig()'s defaults are CLIP ViT-B/32 (openai/clip-vit-base-patch32)
    "tiny": {
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "projection_dim": 32,
    },
}


def make_model(folder: Path, architecture: str) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipelines.tiny import clip_tokenizer

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**ARCHITECTURES[architecture])).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(folder)


def make_images(folder: Path, count: int, per_prompt: int, size: int) -> list[tuple[Path, str]]:
    generator = np.random.default_rng(0)
    items = []
    for i in range(count):
        coarse = torch.from_numpy(generator.random((1, 3, 8, 8), dtype=np.float32))
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]
        path = folder / f"{i:05d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
        items.append((path, f"a photo of subject number {i // per_prompt}"))
    return items


def per_image_loop(model, processor, items: list[tuple[Path, str]]) -> list[float]:
    """The official packages' way: one image and one prompt per forward pass, PIL preprocessing."""
    scores = []
    with torch.no_grad():
        for path, prompt in items:
            image_inputs = processor(images=Image.open(path), return_tensors="pt")
            text_inputs = processor(
                text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            image = model.get_image_features(**image_inputs).pooler_output
            text = model.get_text_features(**text_inputs).pooler_output
            image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
            scores.append(float((image * text).sum()))
    return scores


def per_call_reload_loop(model, processor, weights: Path, items: list[tuple[Path, str]]) -> list[float]:
    """``hpsv2.score`` called once per image (each image has its own prompt): it reads the checkpoint
    and loads it into the model on every call, then scores as above."""
    from safetensors.torch import load_file

    scores = []
    for item in items:
        model.load_state_dict(load_file(weights))
        scores += per_image_loop(model, processor, [item])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--per-prompt", type=int, default=4, help="images per prompt (as benchmark suites sample)"
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--architecture",
        choices=list(ARCHITECTURES),
        default="vit-b-32",
        help="vit-b-32: compute-bound on a CPU; tiny: overhead-bound, like a GPU at batch 1",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from vialign.config import ScoreConfig
    from vialign.score import run_score

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "model", args.architecture)
        (root / "images").mkdir()
        items = make_images(root / "images", args.images, args.per_prompt, args.size)
        prompts_file = root / "prompts.txt"
        prompts_file.write_text("\n".join(prompt for _, prompt in items) + "\n")
        config = ScoreConfig(
            rewards={
                "clipscore": {"weight": 1.0, "options": {"pretrained": str(root / "model"), "mode": "cosine"}}
            },
            images=[str(root / "images")],
            prompts_file=str(prompts_file),
            batch_size=args.batch,
            out=str(root / "scores.jsonl"),
            overwrite=True,
        )
        # Both sides load their model once, outside the timing (hpsv2.score even reloads it per call).
        from transformers import CLIPModel, CLIPProcessor

        import rewards

        model, processor = (
            CLIPModel.from_pretrained(root / "model").eval(),
            CLIPProcessor.from_pretrained(root / "model"),
        )
        reward = rewards.combine(
            {"clipscore": 1.0}, options={"clipscore": config.rewards["clipscore"].options}
        )
        per_image_loop(model, processor, items[:2])  # warm-up of both paths
        run_score(config, progress=False, reward=reward)
        start = time.perf_counter()
        reference = per_image_loop(model, processor, items)
        loop_seconds = time.perf_counter() - start
        start = time.perf_counter()
        report = run_score(config, progress=False, reward=reward)
        ours_seconds = time.perf_counter() - start
        reload_items = items[: max(4, args.images // 4)]
        start = time.perf_counter()
        per_call_reload_loop(model, processor, root / "model" / "model.safetensors", reload_items)
        reload_rate = len(reload_items) / (time.perf_counter() - start)
        ours = [row["total"] for row in report.rows]
    difference = np.abs(np.array(ours) - np.array(reference)).max()
    print(
        f"CLIP {args.architecture} architecture, {args.images} PNGs of {args.size}x{args.size}, {args.per_prompt} per prompt, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"per-image loop (official processor, batch 1): {args.images / loop_seconds:7.2f} images/s "
        f"({loop_seconds:.1f} s)"
    )
    print(
        f"vialign score (batch {args.batch}):             {args.images / ours_seconds:7.2f} images/s "
        f"({ours_seconds:.1f} s, reading files and writing scores.jsonl included)"
    )
    print(
        f"hpsv2.score called per image (reloads the checkpoint each call): {reload_rate:7.2f} images/s "
        f"(on {len(reload_items)} images)"
    )
    ours_rate = args.images / ours_seconds
    print(
        f"throughput ratio vs the per-image loop: {loop_seconds / ours_seconds:.2f}; vs per-call reloading: "
        f"{ours_rate / reload_rate:.2f} (target >= 3); max score difference {difference:.1e}"
    )


if __name__ == "__main__":
    main()
