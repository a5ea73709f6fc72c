"""Alignment on the ShapeWorld video testbed: one preset's run, its learning curve and a before/after strip.

    python benchmarks/video_alignment.py                          # configs/shapeworld_video_draft.yaml
    python benchmarks/video_alignment.py --out /tmp/v train.max_steps=40   # overrides, key=value

Runs ``vialign train CONFIG`` in this process (the shipped Wan-architecture generator ``shapeworld-video``,
a LoRA trained on ``shapeworld-video:align`` against the learned reward ``shapeworld-video-clip`` only;
the rule-based oracle judges the 6 never-trained held-out triples of ``shapeworld-video:eval`` at the
preset's evaluation seeds, and the 24 pretraining prompts as a regression check). It then writes to
``OUT`` (default ``benchmarks/results``):

* ``video_alignment.json``: every evaluation (step, training seconds, oracle accuracy and its standard error,
  per attribute, regression accuracy), the total wall-clock, and a check on fresh seeds: the base model
  and the final LoRA on the eval prompts at ``FRESH_SEEDS`` seeds that neither training nor the
  evaluations draw (the preset's length was chosen on the evaluations' curve, so their seeds are not
  an unbiased measure of it);
* ``video_alignment.png``: for each eval prompt, the 9 frames of one video before (base model) and after
  (the final LoRA), from the same initial noise, one row each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
STRIP_SEED = 2**40  # a seed neither training nor evaluation draws
FRESH_SEEDS = [2**41 + i for i in range(64)]  # seeds neither training nor evaluation draws


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shapeworld_video_draft.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from pipelines import load_pipeline
    from rewards import shapeworld_video as swv
    from vialign import media
    from vialign.config import TrainConfig, load_config
    from vialign.testbed import evaluate
    from vialign.trainer import Trainer

    config = load_config(TrainConfig, args.config, ["overwrite=true", *args.overrides])
    start = time.time()
    Trainer(config, progress=True).train()
    wall = time.time() - start
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evaluations = [
        {
            "step": r["step"],
            "oracle_accuracy": r["eval/oracle_accuracy"],
            "oracle_accuracy_se": r.get("eval/oracle_accuracy_se"),
            "per_attribute": {a: r.get(f"eval/oracle/{a}") for a in swv.ATTRIBUTES},
            "regression_accuracy": r.get("eval/regression/oracle_accuracy"),
            "reward": r.get("eval/shapeworld-video-clip"),
        }
        for r in rows
        if "eval/oracle_accuracy" in r
    ]
    first, last = evaluations[0], evaluations[-1]
    result = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "overrides": args.overrides,
        "wall_clock_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "evaluations": evaluations,
        "gain_points": round(100 * (last["oracle_accuracy"] - first["oracle_accuracy"]), 1),
    }
    prompts = swv.eval_prompts()
    base = load_pipeline(config.model.path, device="cpu")
    tuned = load_pipeline(config.model.path, device="cpu", lora=str(Path(config.output_dir) / "final"))
    fresh = {}
    for name, adapter in (("base", base), ("final", tuned)):
        report = evaluate.oracle_report(evaluate.generate(adapter, prompts, FRESH_SEEDS, size=swv.FRAME_SIZE))
        accuracy, se = evaluate.mean_and_se(
            report.correct.float(), len(FRESH_SEEDS)
        )  # as the trainer's "_se"
        fresh[name] = {"oracle_accuracy": accuracy, "se": se, "per_attribute": report.per_attribute}
    fresh["seeds"] = len(FRESH_SEEDS)
    fresh["gain_points"] = round(
        100 * (fresh["final"]["oracle_accuracy"] - fresh["base"]["oracle_accuracy"]), 1
    )
    result["fresh_seeds"] = fresh
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "video_alignment.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"shapeworld-video:eval oracle accuracy {100 * first['oracle_accuracy']:.1f} -> "
        f"{100 * last['oracle_accuracy']:.1f} ({result['gain_points']:+.1f} points) in {wall:.0f} s; "
        f"at {len(FRESH_SEEDS)} fresh seeds {100 * fresh['base']['oracle_accuracy']:.1f} -> "
        f"{100 * fresh['final']['oracle_accuracy']:.1f} ({fresh['gain_points']:+.1f} points)"
    )

    # before / after: the same initial noise through the base model and the final LoRA
    strips = []
    for adapter in (base, tuned):
        strips.append(evaluate.generate(adapter, prompts, [STRIP_SEED], size=swv.FRAME_SIZE).pixels)
    rows_in_order = torch.stack(strips, 1).flatten(0, 1)  # prompt-major: before, after
    media.save_grid(rows_in_order.flatten(0, 1), args.out / "video_alignment.png", swv.NUM_FRAMES, scale=3)
    (args.out / "video_alignment.txt").write_text(
        "rows of video_alignment.png (9 frames each; for each prompt: base model, then the final LoRA):\n"
        + "\n".join(prompts)
        + "\n"
    )


if __name__ == "__main__":
    main()
