"""Speed of vialign's ODE sampling against the stock diffusers pipeline on the same model, in one run.

    python benchmarks/sampling.py [--families sd sdxl sd3 flux] [--steps 20] [--batch 4] [--size 128]

Both sides go from prompts to decoded float pixels (stock: ``output_type="pt"``; vialign: prompt
encoding without its cache, initial noise, ``rollout``, ``decode``), with the same model object,
steps, guidance, size and generators. Runs alternate (stock, vialign, stock, ...) after a warm-up and
the median of each is compared. Target: time ratio vialign / stock <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import pipelines  # noqa: E402
from pipelines import tiny  # noqa: E402
from vialign.sampling import rollout_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["sd", "sdxl", "sd3", "flux"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    prompts = [f"a photo of object number {i}" for i in range(args.batch)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps, batch {args.batch}, "
        f"{args.size}x{args.size}, guidance {args.guidance}"
    )
    print(f"{'family':8s} {'stock s':>9s} {'vialign s':>10s} {'ratio':>7s} {'ratio of minima':>16s}")
    for family in args.families:
        benchmark_family(family, prompts, args)


def benchmark_family(family: str, prompts: list[str], args: argparse.Namespace) -> None:
    pipe = tiny.build(family)
    pipe.set_progress_bar_config(disable=True)
    adapter = pipelines.ADAPTERS[type(pipe).__name__].from_pipeline(
        pipe, model_id=f"tiny-{family}", device="cpu"
    )
    adapter.cache_prompts = False  # the stock pipeline encodes prompts every call, so do we

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(args.batch)]

    def run_stock():
        with torch.no_grad():
            return pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.size,
                width=args.size,
                generator=generators(),
                output_type="pt",
            ).images

    def run_vialign():
        with torch.no_grad():
            schedule = adapter.schedule(args.steps, args.size, args.size)
            trajectory = rollout_prompts(
                adapter,
                prompts,
                range(args.batch),
                schedule,
                height=args.size,
                width=args.size,
                guidance=adapter.make_guidance(args.guidance),
            )
            return adapter.decode(trajectory.final)

    reference, ours = run_stock(), run_vialign()  # warm-up, and a check that both compute the same thing
    max_diff = (reference.float() - ours).abs().max().item()
    times: dict[str, list[float]] = {"stock": [], "vialign": []}
    for _ in range(args.repeats):
        for name, fn in (("stock", run_stock), ("vialign", run_vialign)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    stock, ours_t = statistics.median(times["stock"]), statistics.median(times["vialign"])
    best = min(times["vialign"]) / min(times["stock"])
    print(
        f"{family:8s} {stock:9.3f} {ours_t:10.3f} {ours_t / stock:7.3f} {best:16.3f}   "
        f"(medians of {args.repeats}; max pixel difference {max_diff:.1e})"
    )


if __name__ == "__main__":
    main()
