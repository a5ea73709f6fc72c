"""Peak memory of backpropagating through a whole sampling chain, with and without per-step
checkpointing, measured in separate processes (``ru_maxrss``).

    python benchmarks/memory.py [--steps 10 25 50] [--size 256] [--batch 2] [--model tiny-sd]
    python benchmarks/memory.py --video [--frames 9] [--video-size 256] [--video-steps 10 20 50]

For each chain length N it runs four fresh processes on the same model, prompts and noise:
``nograd`` (the baseline: sampling and decoding without gradients), ``plain`` (gradients through all
N steps and the VAE decode, every activation stored), ``checkpoint`` (DRaFT with K = N: the same
gradients, each denoiser step and the decode recomputed in the backward pass) and ``adjoint`` (an
Adjoint Matching step: memoryless rollout without grad, the reward's gradient through the decoder, the
lean adjoint by one VJP per step, the regression loss at all N steps) and ``draft_plus`` (a DRaFT+ step
of ``vialign.algorithms.draft`` with K = N: the checkpointed chain plus the KL term over all N steps,
each policy call checkpointed; LoRA rank 4, the reference = LoRA off). Activation memory = peak -
baseline. Targets: at N = 50 checkpointed <= 1/4 of plain; for checkpoint, adjoint and draft_plus,
peak(50) / peak(10) <= 1.3 while the plain chain grows about linearly. Last, one ReNO noise update (``vialign.steering.reno``) at
``--reno-steps`` (default 4 and 20): target peak(20) / peak(4) <= 1.3. Workers run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS tracks live tensors rather than allocator fragmentation.

``--video`` measures a video model the same way (default ``tiny-wan``, ``--frames 9`` at
``--video-size 256``): the chain (gradients through all N steps and the decode of every frame, each
step and the decode checkpointed, as DRaFT-K = N) at ``--video-steps`` (default 10 20 50), activation
= peak - the no-grad run's peak, target peak(50) / peak(10) <= 1.3 (the plain chain alongside); and the
decoder alone (gradients from the decoded pixels' mean back to the latents, no checkpointing) for
``frames=[0]`` against every frame, activation = peak - a run that only holds the latents, target
first / all <= 0.5 (the causal VAE decodes latent frame 0 alone for frame 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


VIDEO_MODES = ("video_nograd", "video_plain", "video_checkpoint", "decode_base", "decode_all", "decode_first")


def video_worker(args: argparse.Namespace) -> None:
    """One video measurement (``--mode video_*`` or ``decode_*``) in this fresh process."""
    import torch

    import pipelines
    from vialign.sampling import Sampler, rollout_prompts

    torch.manual_seed(0)
    adapter = pipelines.load_pipeline(args.model, device="cpu", max_sequence_length=32)
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    size, frames = args.size, args.frames
    if args.mode.startswith("decode_"):
        shape = (args.batch, *adapter.latent_shape(size, size, frames))
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        loss = latents.sum() * 0
        if args.mode != "decode_base":
            subset = [0] if args.mode == "decode_first" else None
            loss = adapter.decode(latents, frames=subset).mean()
            loss.backward()
    else:
        for param in adapter.denoiser.parameters():
            param.requires_grad_(args.mode != "video_nograd")
        schedule = adapter.schedule(args.n, size, size)
        checkpoint = args.mode == "video_checkpoint"
        with torch.set_grad_enabled(args.mode != "video_nograd"):
            trajectory = rollout_prompts(
                adapter,
                prompts,
                range(args.batch),
                schedule,
                height=size,
                width=size,
                guidance=adapter.make_guidance(args.guidance),
                sampler=Sampler(sde="flow-sde" if adapter.kind == "flow" else "ddim"),
                grad_steps=0 if args.mode == "video_nograd" else args.n,
                checkpoint=checkpoint,
                num_frames=frames,
            )
            loss = adapter.decode(trajectory.final, checkpoint=checkpoint).mean()
            if args.mode != "video_nograd":
                loss.backward()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "n": args.n, "peak_mb": peak_mb, "loss": float(loss)}))


def video_main(args: argparse.Namespace) -> None:
    args.model = args.model if args.model != "tiny-sd" else "tiny-wan"
    args.size = args.video_size
    print(
        f"{args.model}, {args.frames} frames at {args.size}x{args.size}, batch {args.batch}, "
        f"CFG {args.guidance}: "
        "gradients through all N steps and the decode of every frame; peak RSS per fresh process"
    )
    print(f"{'N':>4s} {'no-grad MB':>11s} {'plain +MB':>10s} {'checkpointed +MB':>17s} {'same loss':>10s}")
    activation: dict[str, dict[int, float]] = {"video_plain": {}, "video_checkpoint": {}}
    for n in args.video_steps:
        base = measure(args, "video_nograd", n)
        runs = {mode: measure(args, mode, n) for mode in activation}
        for mode, run in runs.items():
            activation[mode][n] = run["peak_mb"] - base["peak_mb"]
        plain, ckpt = runs["video_plain"]["loss"], runs["video_checkpoint"]["loss"]
        same = abs(plain - ckpt) <= 1e-6 * max(1.0, abs(plain))
        print(
            f"{n:4d} {base['peak_mb']:11.0f} {activation['video_plain'][n]:10.0f} "
            f"{activation['video_checkpoint'][n]:17.0f} {str(same):>10s}"
        )
    first, last = min(args.video_steps), max(args.video_steps)
    for mode, values in activation.items():
        growth = values[last] / values[first] if values[first] > 0 else float("nan")
        target = (
            "" if mode == "video_plain" else f" ({'meets' if growth <= 1.3 else 'MISSES'} the <= 1.3 target)"
        )
        print(f"{mode:>16s}: activation peak(N={last}) / peak(N={first}) = {growth:.2f}{target}")
    base = measure(args, "decode_base", 0)["peak_mb"]
    decode = {mode: measure(args, mode, 0)["peak_mb"] - base for mode in ("decode_all", "decode_first")}
    ratio = decode["decode_first"] / decode["decode_all"] if decode["decode_all"] > 0 else float("nan")
    print(
        f"decoder (gradient to the latents, not checkpointed): +{decode['decode_all']:.0f} MB for all "
        f"{args.frames} frames, +{decode['decode_first']:.0f} MB for frames=[0]; ratio {ratio:.2f} "
        f"({'meets' if ratio <= 0.5 else 'MISSES'} the <= 0.5 target)"
    )


def worker(args: argparse.Namespace) -> None:
    if args.mode in VIDEO_MODES:
        video_worker(args)
        return
    import torch

    import pipelines
    from vialign.sampling import Sampler, rollout_prompts

    torch.manual_seed(0)
    adapter = pipelines.load_pipeline(args.model, device="cpu")
    for param in adapter.denoiser.parameters():
        param.requires_grad_(args.mode != "nograd")
    schedule = adapter.schedule(args.n, args.size, args.size)
    guidance = adapter.make_guidance(args.guidance)
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    sampler = Sampler(sde="ddim" if adapter.kind == "diffusion" else "flow-sde")
    if args.mode == "draft_plus":
        import rewards
        from vialign.algorithms import TrainingContext
        from vialign.algorithms.draft import DRaFT, DraftSettings

        adapter.add_lora(4, 4.0, None)
        context = TrainingContext(
            adapter=adapter,
            reward=rewards.combine({"brightness": 1.0}),
            reward_weights={"brightness": 1.0},
            prompts=prompts,
            seed=0,
            num_steps=args.n,
            height=args.size,
            width=args.size,
            guidance=guidance,
            sampling=None,
            reference=adapter.lora_disabled,
        )
        settings = DraftSettings(
            prompts_per_step=args.batch, micro_batch_size=args.batch, grad_steps=args.n, kl_coeff=0.1
        )
        metrics = DRaFT(settings, context).step(1)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"mode": args.mode, "n": args.n, "peak_mb": peak_mb, "loss": metrics["loss"]}))
        return
    if args.mode == "reno":
        # one ReNO update (vialign.steering.reno): iteration 0 differentiates the reward w.r.t. the noise
        # through all N checkpointed steps and the decoder, iteration 1 only evaluates
        import rewards
        from vialign.steering import RenoSettings, SamplingSetup, reno

        setup = SamplingSetup(schedule, args.size, args.size, guidance)
        result = reno(
            adapter,
            rewards.combine({"brightness": 1.0}),
            prompts,
            list(range(args.batch)),
            setup,
            settings=RenoSettings(iterations=2),
            batch_size=args.batch,
        )
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps(
                {"mode": args.mode, "n": args.n, "peak_mb": peak_mb, "loss": float(result.reward.sum())}
            )
        )
        return
    if args.mode == "adjoint":
        import contextlib

        from vialign.algorithms.adjoint_matching import lean_adjoint, memoryless_sampler, regression_loss

        sampler = memoryless_sampler(adapter.kind)
        with torch.no_grad():
            trajectory = rollout_prompts(
                adapter,
                prompts,
                range(args.batch),
                schedule,
                height=args.size,
                width=args.size,
                guidance=guidance,
                sampler=sampler,
            )
        x = trajectory.final.detach().requires_grad_(True)
        (terminal,) = torch.autograd.grad(adapter.decode(x, checkpoint=True).mean(), x)
        no_cfg = adapter.make_guidance(1.0)
        adjoints = lean_adjoint(
            adapter, schedule, sampler, trajectory.latents, -terminal, trajectory.cond, no_cfg
        )
        loss = regression_loss(
            adapter,
            schedule,
            sampler,
            trajectory.latents,
            adjoints,
            range(args.n),
            trajectory.cond,
            no_cfg,
            None,
            contextlib.nullcontext,
        ).mean()
        loss.backward()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"mode": args.mode, "n": args.n, "peak_mb": peak_mb, "loss": loss.item()}))
        return
    checkpoint = args.mode == "checkpoint"
    with torch.set_grad_enabled(args.mode != "nograd"):
        trajectory = rollout_prompts(
            adapter,
            prompts,
            range(args.batch),
            schedule,
            height=args.size,
            width=args.size,
            guidance=guidance,
            sampler=sampler,
            grad_steps=0 if args.mode == "nograd" else args.n,
            checkpoint=checkpoint,
        )
        loss = adapter.decode(trajectory.final, checkpoint=checkpoint).mean()
        if args.mode != "nograd":
            loss.backward()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"mode": args.mode, "n": args.n, "peak_mb": peak_mb, "loss": loss.item()}))


def measure(args: argparse.Namespace, mode: str, n: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--mode",
        mode,
        "--n",
        str(n),
        "--model",
        args.model,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--guidance",
        str(args.guidance),
        "--frames",
        str(args.frames),
    ]
    # Large blocks through mmap, so that freed tensors go back to the OS at once: RSS then measures live
    # memory, not glibc's fragmented high-water mark (which otherwise grows with the number of steps).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"worker {mode} N={n} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--reno-steps", type=int, nargs=2, default=[4, 20], help="ReNO chain lengths compared (peak ratio)"
    )
    parser.add_argument("--reno-only", action="store_true", help="measure only the ReNO chain lengths")
    parser.add_argument(
        "--video",
        action="store_true",
        help="a video model instead (default tiny-wan): chain and decoder memory",
    )
    parser.add_argument("--frames", type=int, default=9, help="--video: frames per video")
    parser.add_argument("--video-size", type=int, default=256, help="--video: height and width")
    parser.add_argument(
        "--video-steps", type=int, nargs="+", default=[10, 20, 50], help="--video: chain lengths"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--mode",
        choices=["nograd", "plain", "checkpoint", "adjoint", "draft_plus", "reno", *VIDEO_MODES],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.video:
        video_main(args)
        return
    print(
        f"{args.model}, {args.size}x{args.size}, batch {args.batch}, CFG {args.guidance}: gradients through all N "
        "steps and the VAE decode; peak RSS per fresh process"
    )
    print(
        f"{'N':>4s} {'no-grad MB':>11s} {'plain +MB':>10s} {'checkpointed +MB':>17s} {'ratio':>7s} {'same loss':>10s}"
        f" {'adjoint +MB':>12s} {'DRaFT+ +MB':>11s}"
    )
    modes = ("plain", "checkpoint", "adjoint", "draft_plus")
    ratios, activation = {}, {mode: {} for mode in modes}
    for n in [] if args.reno_only else args.steps:
        base = measure(args, "nograd", n)
        runs = {mode: measure(args, mode, n) for mode in modes}
        for mode, run in runs.items():
            activation[mode][n] = run["peak_mb"] - base["peak_mb"]
        plain, ckpt = runs["plain"], runs["checkpoint"]
        plain_act, ckpt_act = activation["plain"][n], activation["checkpoint"][n]
        ratios[n] = ckpt_act / plain_act if plain_act > 0 else float("nan")
        same = abs(plain["loss"] - ckpt["loss"]) <= 1e-6 * max(1.0, abs(plain["loss"]))
        print(
            f"{n:4d} {base['peak_mb']:11.0f} {plain_act:10.0f} {ckpt_act:17.0f} {ratios[n]:7.3f} {str(same):>10s}"
            f" {activation['adjoint'][n]:12.0f} {activation['draft_plus'][n]:11.0f}"
        )
    first, last = min(args.steps), max(args.steps)
    for mode, values in activation.items() if not args.reno_only else ():
        growth = values[last] / values[first] if values[first] > 0 else float("nan")
        target = "" if mode == "plain" else f" ({'meets' if growth <= 1.3 else 'MISSES'} the <= 1.3 target)"
        print(f"{mode:>10s}: activation peak(N={last}) / peak(N={first}) = {growth:.2f}{target}")
    if not args.reno_only:
        verdict = "meets" if ratios[last] <= 0.25 else "MISSES"
        print(
            f"N={last}: checkpointed / plain activation memory = {ratios[last]:.3f} ({verdict} the <= 0.25 target)"
        )
    short, long = args.reno_steps
    reno_runs = {n: measure(args, "reno", n) for n in (short, long)}
    reno_base = {n: measure(args, "nograd", n)["peak_mb"] for n in (short, long)}
    peak_ratio = reno_runs[long]["peak_mb"] / reno_runs[short]["peak_mb"]
    print(
        f"ReNO (one noise update through the checkpointed chain and decoder): peak {reno_runs[short]['peak_mb']:.0f} MB "
        f"at N={short}, {reno_runs[long]['peak_mb']:.0f} MB at N={long} (activation +"
        f"{reno_runs[short]['peak_mb'] - reno_base[short]:.0f} / +{reno_runs[long]['peak_mb'] - reno_base[long]:.0f} MB); "
        f"peak ratio {peak_ratio:.2f} ({'meets' if peak_ratio <= 1.3 else 'MISSES'} the <= 1.3 target)"
    )


if __name__ == "__main__":
    main()
