"""Every alignment method on the same protocol: the ShapeWorld split, the same seeds, the same budget.

    python benchmarks/alignment.py                            # every method, 600 s of training each
    python benchmarks/alignment.py --methods refl grpo --budget 300
    python benchmarks/alignment.py --out benchmarks/results   # where the table, plot and JSON go

Protocol (README, "Alignment on the testbed"): each method trains a LoRA on the shipped ShapeWorld flow
model from its testbed preset (``METHODS``), on ``shapeworld:align`` with the learned reward
``shapeworld-clip`` only (offline DPO: the shipped preference pairs, none on an eval prompt), until ``--budget`` seconds of training (wall clock of the training steps, on
this machine, nothing else running; evaluation is not counted). Offline DPO, which makes epochs over a
fixed set of pairs, also stops at its preset's ``train.max_steps``, where its learning-rate schedule ends. It is judged every ``--eval-every``
training seconds and at the end, by the trainer's own evaluation: the rule-based oracle on the 18
``shapeworld:eval`` prompts x 8 evaluation seeds (seeds no training draws), with the standard error over
seeds; the oracle on the 108 pretraining prompts x 2 seeds (a regression check); the learned reward on
the eval split; pixel diversity. Every method starts from the same model, LoRA initialisation and seeds.

The multi-reward study (``grpo_sum_distractor``, ``grpo_pareto_distractor``) breaks the one-reward rule
on purpose: GRPO trains on ``shapeworld-clip`` plus ``brightness`` x 50, summed or Pareto-selected
(Parrot), and its own table adds the distractor's mean on the eval split.

Each method runs in its own process (so ``ru_maxrss`` is its peak memory); the parent writes
``OUT/alignment.json`` (every curve), ``OUT/alignment.md`` (the table) and ``OUT/alignment.png``
(eval-split and pretraining-prompt accuracy against training wall-clock, one line per method; needs
matplotlib: ``pip install -e ".[bench]"``). Methods run into a folder that already holds results replace
their own rows and keep the others', so ``--methods dpo`` adds a row to the full table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

# method -> (testbed preset, label, overrides); the presets hold each method's hyper-parameters
METHODS = {
    "refl": ("configs/quickstart.yaml", "ReFL", []),
    "grpo": ("configs/quickstart_grpo.yaml", "GRPO", []),
    "grpo_winrate": (
        "configs/quickstart_grpo.yaml",
        "GRPO, pairwise win rates (Pref-GRPO)",
        ["grpo.comparison=pairwise-winrate"],
    ),
    "draft": ("configs/quickstart_draft.yaml", "DRaFT-K", []),
    "adjoint_matching": ("configs/quickstart_adjoint.yaml", "Adjoint Matching", []),
    "dpo": ("configs/quickstart_dpo.yaml", "DPO (offline pairs)", []),
    "online_dpo": ("configs/quickstart_online_dpo.yaml", "online DPO", []),
    "raft": ("configs/quickstart_raft.yaml", "RAFT", []),
    "rwr": ("configs/quickstart_rwr.yaml", "RWR", []),
    # the variants the RAFT / RWR defaults were chosen against: the sampler's final latents fitted with the
    # CFG-guided prediction (no prompt dropout), reference samples, lr 5e-5
    "raft_guided_final": (
        "configs/quickstart_raft.yaml",
        "RAFT, final latents, guided loss",
        ["raft.targets=final", "raft.loss_guidance=sampling", "data.prompt_dropout=0.0"],
    ),
    "rwr_guided_final": (
        "configs/quickstart_rwr.yaml",
        "RWR, final latents, guided loss",
        ["rwr.targets=final", "rwr.loss_guidance=sampling", "data.prompt_dropout=0.0"],
    ),
    # the multi-reward study: the learned reward plus a distractor (brightness x 50: its spread inside a
    # group is ~2.5x the learned reward's), summed or Pareto-selected (Parrot); the oracle still judges
    "grpo_sum_distractor": (
        "configs/quickstart_grpo.yaml",
        "GRPO, shapeworld-clip + 50 x brightness (sum)",
        ["rewards={shapeworld-clip: {weight: 1.0}, brightness: {weight: 50.0}}"],
    ),
    "grpo_pareto_distractor": (
        "configs/quickstart_grpo.yaml",
        "GRPO, shapeworld-clip and brightness (Parrot's Pareto selection)",
        ["rewards={shapeworld-clip: {weight: 1.0}, brightness: {weight: 50.0}}", "grpo.reward_mode=pareto"],
    ),
    "grpo_pareto_min_distractor": (
        "configs/quickstart_grpo.yaml",
        "GRPO, shapeworld-clip and brightness (Pareto selection, worst per-reward advantage)",
        [
            "rewards={shapeworld-clip: {weight: 1.0}, brightness: {weight: 50.0}}",
            "grpo.reward_mode=pareto",
            "grpo.pareto_advantages=min",
        ],
    ),
}
# may train on brightness too
DISTRACTOR_STUDY = {"grpo_sum_distractor", "grpo_pareto_distractor", "grpo_pareto_min_distractor"}
FIXED_DATA = {"dpo"}  # methods that stop at their preset's max_steps (epochs over a fixed dataset)
# the protocol, the same for every method whatever its preset says
PROTOCOL = [
    "data.eval=shapeworld:eval",
    "eval.rewards=[shapeworld-oracle, shapeworld-clip]",
    "eval.samples_per_prompt=8",
    "eval.regression_prompts=shapeworld:train",
    "eval.regression_samples_per_prompt=2",
    "eval.max_prompts=null",
    "seed=0",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "train.tensorboard=false",
    "train.max_steps=1000000",
    "overwrite=true",
]
KEPT = {  # what the curve keeps of each evaluation: metric -> short name
    "eval/oracle_accuracy": "accuracy",
    "eval/oracle_accuracy_se": "accuracy_se",
    "eval/regression/oracle_accuracy": "pretraining_accuracy",
    "eval/regression/oracle_accuracy_se": "pretraining_accuracy_se",
    "eval/shapeworld-clip": "reward",
    "eval/shapeworld-clip_se": "reward_se",
    "eval/pixel_diversity": "diversity",
    "eval/brightness": "brightness",
    "eval/oracle/shape": "shape",
    "eval/oracle/colour": "colour",
}


def run_method(method: str, budget: float, eval_every: float, overrides: list[str]) -> dict:
    """Train one method for ``budget`` seconds of training steps, evaluating along the way."""
    from vialign.cli import _quiet_libraries
    from vialign.config import TrainConfig, load_config
    from vialign.trainer import Trainer

    _quiet_libraries()
    config_path, _, own = METHODS[method]
    overrides = [*own, *overrides]
    if method in DISTRACTOR_STUDY:
        overrides.append("eval.rewards=[shapeworld-oracle, shapeworld-clip, brightness]")
    output_dir = tempfile.mkdtemp(prefix=f"alignment-{method}-")
    preset = load_config(TrainConfig, ROOT / config_path, overrides)
    config = load_config(TrainConfig, ROOT / config_path, [*PROTOCOL, f"output_dir={output_dir}", *overrides])
    # offline DPO trains epochs over a fixed set of pairs: it stops at its preset's max_steps (where its
    # learning-rate schedule ends) even inside the budget; every other method trains until the budget
    max_steps = preset.train.max_steps if method in FIXED_DATA else None
    if max_steps is not None:
        config.train.max_steps = max_steps
    # prompt algorithms train on shapeworld:align; preference algorithms on the shipped pairs, from which
    # the shapeworld:eval prompts are removed (vialign.preferences)
    config.data.train = "shapeworld:preferences" if method == "dpo" else "shapeworld:align"
    if not set(config.rewards) <= {"shapeworld-clip"} and method not in DISTRACTOR_STUDY:
        raise SystemExit(
            f"{config_path}: the protocol trains on shapeworld-clip only, not {list(config.rewards)}"
        )
    trainer = Trainer(config, progress=False)
    curve = []

    def evaluate(step: int, seconds: float) -> None:
        start = time.perf_counter()
        results = trainer.evaluate(step)
        point = {"step": step, "train_seconds": round(seconds, 1)}
        point.update({short: results[name] for name, short in KEPT.items() if name in results})
        point["eval_seconds"] = round(time.perf_counter() - start, 1)
        curve.append(point)
        print(f"[{method}] {json.dumps(point)}", file=sys.stderr, flush=True)

    evaluate(0, 0.0)
    seconds, step, next_eval = 0.0, 0, eval_every
    while seconds < budget and (max_steps is None or step < max_steps):
        step += 1
        start = time.perf_counter()
        trainer.algorithm.step(step)
        seconds += time.perf_counter() - start
        if seconds >= next_eval and seconds < budget and step != max_steps:
            evaluate(step, seconds)
            next_eval += eval_every
    evaluate(step, seconds)
    return {
        "method": method,
        "config": config_path,
        "overrides": overrides,
        "budget_seconds": budget,
        "steps": step,
        "seconds_per_step": round(seconds / step, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "curve": curve,
    }


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(results: list[dict]) -> str:
    head = (
        "| method (preset) | steps in budget (s/step) | eval-split accuracy, start -> end (± SE) | best along "
        "the curve | pretraining prompts, start -> end | `shapeworld-clip` (eval split) | pixel diversity "
        "| peak memory |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for result in results:
        if result["method"] in DISTRACTOR_STUDY:
            continue
        first, last = result["curve"][0], result["curve"][-1]
        best = max(result["curve"], key=lambda p: p["accuracy"])
        label = METHODS.get(result["method"], (None, result["method"]))[1]
        gain = 100 * (last["accuracy"] - first["accuracy"])
        rows.append(
            f"| {label} (`{Path(result['config']).name}`) | {result['steps']} ({result['seconds_per_step']} s) "
            f"| {pct(first['accuracy'])} ± {pct(first['accuracy_se'])} -> **{pct(last['accuracy'])} ± "
            f"{pct(last['accuracy_se'])}** ({gain:+.1f}) "
            f"| {pct(best['accuracy'])} at {best['train_seconds']:.0f} s "
            f"| {pct(first.get('pretraining_accuracy'))} -> {pct(last.get('pretraining_accuracy'))} "
            f"| {first['reward']:+.2f} -> {last['reward']:+.2f} "
            f"| {first['diversity']:.3f} -> {last['diversity']:.3f} | {result['peak_rss_mb']} MB |"
        )
    study = [r for r in results if r["method"] in DISTRACTOR_STUDY]
    if not study:
        return head + "\n".join(rows) + "\n"
    extra = [
        "",
        "Multi-reward study (trains on `shapeworld-clip` and the distractor `brightness`, weight 50):",
        "",
        "| method | steps in budget (s/step) | eval-split accuracy, start -> end (± SE) | `shapeworld-clip` "
        "(eval split) | `brightness` (eval split) | pixel diversity |",
        "|---|---|---|---|---|---|",
    ]
    for result in study:
        first, last = result["curve"][0], result["curve"][-1]
        gain = 100 * (last["accuracy"] - first["accuracy"])
        extra.append(
            f"| {METHODS[result['method']][1]} | {result['steps']} ({result['seconds_per_step']} s) "
            f"| {pct(first['accuracy'])} ± {pct(first['accuracy_se'])} -> **{pct(last['accuracy'])} ± "
            f"{pct(last['accuracy_se'])}** ({gain:+.1f}) | {first['reward']:+.2f} -> {last['reward']:+.2f} "
            f"| {first.get('brightness', float('nan')):.3f} -> {last.get('brightness', float('nan')):.3f} "
            f"| {first['diversity']:.3f} -> {last['diversity']:.3f} |"
        )
    return head + "\n".join(rows) + "\n" + "\n".join(extra) + "\n"


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('the plot needs matplotlib: pip install -e ".[bench]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    panels = [
        ("accuracy", "oracle accuracy on shapeworld:eval (%)"),
        ("pretraining_accuracy", "oracle accuracy on the pretraining prompts (%)"),
    ]
    for axis, (key, ylabel) in zip(axes, panels):
        for result in results:
            curve = [p for p in result["curve"] if key in p]
            x = [p["train_seconds"] / 60 for p in curve]
            y = [100 * p[key] for p in curve]
            se = [100 * p[key + "_se"] for p in curve]
            label = METHODS.get(result["method"], (None, result["method"]))[1]
            line = axis.plot(x, y, marker="o", markersize=3, label=label)[0]
            axis.fill_between(
                x,
                [a - e for a, e in zip(y, se)],
                [a + e for a, e in zip(y, se)],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
        axis.set_xlabel("training wall-clock (minutes, 2 CPU cores)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(
        "Learned reward only (offline DPO: oracle-labelled pairs), judged by the oracle (± 1 SE; eval time not counted)"
    )
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budget", type=float, default=600, help="training seconds per method")
    parser.add_argument("--eval-every", type=float, default=120, help="evaluate every N training seconds")
    parser.add_argument("--out", default="benchmarks/results", help="folder for alignment.{json,md,png}")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every method (e.g. optim.lr=1e-3)",
    )
    parser.add_argument(
        "--replot", action="store_true", help="redraw the table and plot from OUT/alignment.json"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # method run in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_method(args.worker, args.budget, args.eval_every, args.set)
        Path(args.result).write_text(json.dumps(result, indent=1))
        return

    out = Path(args.out)
    if args.replot:
        write_report(json.loads((out / "alignment.json").read_text())["results"], out)
        return
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for method in args.methods:
        result_path = out / f".alignment-{method}.json"
        command = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--budget",
            str(args.budget),
            "--eval-every",
            str(args.eval_every),
            "--result",
            str(result_path),
            "--set",
            *args.set,
        ]
        print(f"{method}: {METHODS[method][0]}, {args.budget:.0f} s of training", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        results.append(json.loads(result_path.read_text()))
        result_path.unlink()
    command = (
        "python benchmarks/alignment.py"
        + (f" --methods {' '.join(args.methods)}" if args.methods != list(METHODS) else "")
        + (f" --budget {args.budget:g}" if args.budget != 600 else "")
        + (f" --set {' '.join(args.set)}" if args.set else "")
    )
    for result in results:
        result["command"] = command
    # methods run earlier into the same folder stay in the report, each with the command that ran it
    saved = out / "alignment.json"
    earlier = json.loads(saved.read_text())["results"] if saved.exists() else []
    ran = {r["method"] for r in results}
    merged = [r for r in earlier if r["method"] not in ran] + results
    merged.sort(key=lambda r: list(METHODS).index(r["method"]) if r["method"] in METHODS else len(METHODS))
    saved.write_text(json.dumps({"results": merged}, indent=1) + "\n")
    write_report(merged, out)


def write_report(results: list[dict], out: Path) -> None:
    markdown = table(results)
    commands = sorted({r.get("command", "python benchmarks/alignment.py") for r in results})
    (out / "alignment.md").write_text("".join(f"<!-- {c} -->\n" for c in commands) + markdown)
    plot(results, out / "alignment.png")
    print(markdown)
    print(f"wrote {out / 'alignment.md'}, {out / 'alignment.png'}, {out / 'alignment.json'}")


if __name__ == "__main__":
    main()
