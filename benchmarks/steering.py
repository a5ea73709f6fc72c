"""Inference-time steering on the alignment protocol: each method against plain sampling at the same seeds.

    python benchmarks/steering.py                      # every method, ~20 minutes on 2 CPU cores
    python benchmarks/steering.py --methods best-of-n smc --out /tmp/steer
    python benchmarks/steering.py --replot             # redraw table and plot from OUT/steering.json

Protocol (README, "Steering at inference time"): the shipped ShapeWorld flow model without any LoRA; the
18 ``shapeworld:eval`` prompts x 8 evaluation seeds (``evaluation_seed(0..7)``, the seeds the trainer's
evaluation uses, so the plain row is the fine-tuning methods' starting point); the model's sampling
settings (20 steps, CFG 4); the steering reward is the learned ``shapeworld-clip``; the judge is the
rule-based oracle, which no method sees. Each setting reports oracle accuracy with its standard error
over seeds, the steering reward of the kept samples, denoiser evaluations per kept image relative to
plain sampling (NFE x, measured by counting the rows the denoiser sees; CFG counted in both, ReNO's
checkpoint recomputation included), and wall time. Writes OUT/steering.json, OUT/steering.md (the
table) and OUT/steering.png (accuracy against NFE x; needs matplotlib: ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = {  # method -> list of (label, options)
    "plain": [("plain ODE", {}), ("plain SDE (flow-sde)", {"sde": True})],
    "best-of-n": [(f"best-of-{n}", {"n": n}) for n in (2, 4, 8)],
    "smc": [(f"SMC, {n} particles", {"particles": n}) for n in (2, 4, 8)],
    # one 50-iteration run per learning rate, judged at 10, 25 and 50 iterations (best iterate so far);
    # lr 0.5: the reference's relative step (lr x clip / |z|) on SD 1.5's 16384-dim latent, here 256 dims
    "reno": [(f"ReNO, {k} iterations", {"iterations": k, "lr": 5.0}) for k in (5, 10, 25, 50)]
    + [(f"ReNO lr 0.5, {k} iterations", {"iterations": k, "lr": 0.5}) for k in (5, 10, 25, 50)],
    "guidance": [(f"guidance, scale {s:g}", {"scale": s}) for s in (0.5, 2.0)],
}


def judge(result_pixels, rewards_kept, prompts, seeds) -> dict:
    from vialign.testbed import evaluate

    report = evaluate.oracle_report(evaluate.Samples(result_pixels.cpu(), list(prompts), list(seeds)))
    per_prompt = len(prompts) // len(set(prompts))
    accuracy, accuracy_se = evaluate.mean_and_se(report.correct.float(), per_prompt)
    reward_mean, reward_se = evaluate.mean_and_se(rewards_kept.cpu(), per_prompt)
    return {
        "accuracy": accuracy,
        "accuracy_se": accuracy_se,
        "per_attribute": report.per_attribute,
        "reward": reward_mean,
        "reward_se": reward_se,
    }


def run_reno(adapter, reward, prompts, seeds, budgets: list[int], lr: float) -> list[dict]:
    """One ReNO run of max(budgets) iterations, judged at every budget on the best iterate so far; the
    model calls and wall time of a budget are those the run had spent when it reached that iteration."""
    import torch

    from vialign import steering

    ode = steering.SamplingSetup.for_adapter(adapter)
    snapshots: dict[int, list] = {k: [] for k in budgets}  # iterations -> [(first image, pixels, reward)]
    spent: dict[int, list[float]] = {k: [0.0, 0.0] for k in budgets}  # iterations -> [calls, seconds]
    batch = 48
    for start in range(0, len(prompts), batch):
        began = time.perf_counter()
        with steering.count_model_calls(adapter) as calls:

            def on_iteration(iteration, _first, best_pixels, best_reward, start=start, began=began):
                if iteration + 1 in snapshots:
                    snapshots[iteration + 1].append((start, best_pixels.clone(), best_reward.clone()))
                    spent[iteration + 1][0] += calls[0]
                    spent[iteration + 1][1] += time.perf_counter() - began

            steering.reno(
                adapter,
                reward,
                prompts[start : start + batch],
                seeds[start : start + batch],
                ode,
                settings=steering.RenoSettings(iterations=max(budgets), lr=lr),
                batch_size=batch,
                on_iteration=on_iteration,
            )
    rows = []
    for k in budgets:
        parts = sorted(snapshots[k], key=lambda part: part[0])
        pixels = torch.cat([p for _, p, _ in parts])
        kept = torch.cat([r for _, _, r in parts])
        rows.append(
            {
                "method": "reno",
                "options": {"iterations": k, "lr": lr},
                **judge(pixels, kept, prompts, seeds),
                "model_calls_per_image": spent[k][0] / len(prompts),
                "seconds": round(spent[k][1], 1),
                "images": len(prompts),
            }
        )
    return rows


def run(method: str, options: dict, adapter, reward, prompts, seeds) -> dict:
    from vialign import steering
    from vialign.sampling import sde_sampler

    ode = steering.SamplingSetup.for_adapter(adapter)
    sde = steering.SamplingSetup.for_adapter(adapter, sampler=sde_sampler(adapter.kind))
    start = time.perf_counter()
    if method == "plain":
        result = steering.best_of_n(
            adapter, reward, prompts, seeds, sde if options.get("sde") else ode, n=1, batch_size=48
        )
    elif method == "best-of-n":
        result = steering.best_of_n(adapter, reward, prompts, seeds, ode, n=options["n"], batch_size=48)
    elif method == "smc":
        result = steering.smc(
            adapter, reward, prompts, seeds, sde, particles=options["particles"], batch_size=48
        )
    else:
        settings = steering.GuidanceSettings(scale=options["scale"])
        result = steering.reward_guidance(
            adapter, reward, prompts, seeds, ode, settings=settings, batch_size=48
        )
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "options": options,
        **judge(result.pixels, result.reward, prompts, seeds),
        "model_calls_per_image": result.model_calls,
        "seconds": round(seconds, 1),
        "images": len(prompts),
    }


def table(rows: list[dict]) -> str:
    by_label = {r["label"]: r for r in rows}
    out = [
        "<!-- python benchmarks/steering.py -->",
        "| setting | oracle accuracy on `shapeworld:eval` (± SE) | vs plain ODE | `shapeworld-clip` of kept samples "
        "| NFE x plain | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain = by_label.get(r.get("baseline", "plain ODE"), rows[0])
        gain = 100 * (r["accuracy"] - plain["accuracy"])
        out.append(
            f"| {r['label']} | {100 * r['accuracy']:.1f} ± {100 * r['accuracy_se']:.1f} | {gain:+.1f} "
            f"| {r['reward']:+.2f} | {r['model_calls_per_image'] / plain['model_calls_per_image']:.1f} "
            f"| {r['seconds']:.0f} s ({r['images']} images) |"
        )
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    by_label = {r["label"]: r for r in rows}
    plain = by_label.get("plain ODE", rows[0])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] == "plain":
            continue
        name = r["method"] if r["method"] != "reno" else f"reno, lr {r['options']['lr']:g}"
        series.setdefault(name, []).append(r)
    for name, points in series.items():
        x = [
            r["model_calls_per_image"] / by_label[r.get("baseline", "plain ODE")]["model_calls_per_image"]
            for r in points
        ]
        # gains over each row's own plain baseline, drawn from the 144-image plain accuracy
        y = [
            100 * (r["accuracy"] - by_label[r.get("baseline", "plain ODE")]["accuracy"] + plain["accuracy"])
            for r in points
        ]
        err = [100 * r["accuracy_se"] for r in points]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(100 * plain["accuracy"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("denoiser evaluations per image, x plain sampling")
    ax.set_ylabel(
        "oracle accuracy on shapeworld:eval (%; ReNO: its gain\nover plain on its images, added to plain)"
    )
    ax.set_title("Steering the ShapeWorld flow model with shapeworld-clip")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seeds", type=int, default=8, help="evaluation seeds per prompt")
    parser.add_argument(
        "--reno-seeds",
        type=int,
        default=8,
        help="evaluation seeds per prompt for ReNO (fewer for a quicker run: 50 iterations cost ~100 chains)",
    )
    parser.add_argument(
        "--reno-budgets",
        type=int,
        nargs="+",
        default=[5, 10, 25, 50],
        help="ReNO iterations judged (one run)",
    )
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "steering.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    if not args.replot:
        import torch

        import rewards
        from pipelines import load_pipeline
        from rewards import shapeworld as sw
        from vialign.algorithms.base import evaluation_seed
        from vialign.cli import _quiet_libraries

        _quiet_libraries()
        torch.manual_seed(0)
        adapter = load_pipeline("shapeworld", device="cpu")
        reward = rewards.combine({"shapeworld-clip": 1.0}).eval()
        for p in reward.parameters():
            p.requires_grad_(False)
        prompts = [p for p in sw.eval_prompts() for _ in range(args.seeds)]
        seeds = [evaluation_seed(i) for _ in sw.eval_prompts() for i in range(args.seeds)]
        methods = ["plain", *[m for m in args.methods if m != "plain"]]
        rows = [r for r in rows if r["method"] not in methods]
        for method in methods:
            baseline = "plain ODE"
            if method == "reno":
                # ReNO's images: the first --reno-seeds evaluation seeds of every prompt, with their own
                # plain baseline
                few_prompts = [p for p in sw.eval_prompts() for _ in range(args.reno_seeds)]
                few_seeds = [evaluation_seed(i) for _ in sw.eval_prompts() for i in range(args.reno_seeds)]
                baseline = f"plain ODE, ReNO's {len(few_prompts)} images"
                row = {"label": baseline, **run("plain", {}, adapter, reward, few_prompts, few_seeds)}
                rows = [r for r in rows if r["label"] != baseline] + [row]
                SETTINGS["reno"] = [
                    (f"ReNO{'' if lr == 5.0 else f' lr {lr:g}'}, {k} iterations", {"iterations": k, "lr": lr})
                    for lr in (5.0, 0.5)
                    for k in args.reno_budgets
                ]
                measured = []
                for lr in (5.0, 0.5):
                    measured += run_reno(adapter, reward, few_prompts, few_seeds, args.reno_budgets, lr)
            else:
                measured = [
                    run(method, options, adapter, reward, prompts, seeds) for _, options in SETTINGS[method]
                ]
            for (label, _), result in zip(SETTINGS[method], measured):
                row = {"label": label, "baseline": baseline, **result}
                print(
                    f"{label:28s} accuracy {100 * row['accuracy']:.1f} ± {100 * row['accuracy_se']:.1f}, "
                    f"reward {row['reward']:+.2f}, {row['model_calls_per_image']:.0f} model calls/image, "
                    f"{row['seconds']:.0f} s",
                    flush=True,
                )
                rows.append(row)
        labels = [label for settings in SETTINGS.values() for label, _ in settings]
        first_reno = labels.index(SETTINGS["reno"][0][0])  # ReNO's own plain baseline goes just before it
        rows.sort(key=lambda r: labels.index(r["label"]) if r["label"] in labels else first_reno - 0.5)
        results_file.write_text(json.dumps(rows, indent=1) + "\n")
    (out / "steering.md").write_text(table(rows))
    plot(rows, out / "steering.png")
    print(table(rows))


if __name__ == "__main__":
    main()
